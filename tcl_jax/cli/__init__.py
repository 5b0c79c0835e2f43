"""Command-line support shared by every command: config files (also from the installed package),
`--config.<field>` overrides, one-line usage errors and the value checks."""
