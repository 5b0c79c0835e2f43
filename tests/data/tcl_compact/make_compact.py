"""Adds a 'compact' preset to shared/reference/make_fixture.py / make_trajectory.py and runs one."""

import sys

sys.path.insert(0, "/work/shared/reference")
import make_fixture

make_fixture.PRESETS["compact"] = dict(
  embed_dim=16,
  image_resolution=32,
  vision_layers=2,
  vision_width=64,
  vision_patch_size=16,
  context_length=77,
  vocab_size=49408,
  transformer_width=16,
  transformer_heads=2,
  transformer_layers=1,
  ie_freeze=1,
  batch=4,
  train_hw=(32, 32),
  seg_hw=(40, 50),
)
which = sys.argv.pop(1)
if which == "fixture":
  make_fixture.main()
else:
  import make_trajectory

  make_trajectory.main()
