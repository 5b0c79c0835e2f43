"""Performance: the original's own timers (run in a torch venv by `tcl_jax.bench`) and the chips' peak
FLOPs, memory and interconnects that the scaling report and the benchmark use."""
