"""`python -m tcl_jax.miniature --rebuild_clip --workdir=DIR [--output=PATH]`: stage 1 alone, the
tiny CLIP the default run starts from (tcl_jax/assets/miniature_clip.npz)."""

from absl import app
from absl import flags

from tcl_jax.miniature import experiment

flags.DEFINE_bool(
  "rebuild_clip", False, "Train stage 1 (configs/miniature_clip.py) and write its weights file."
)
flags.DEFINE_string("workdir", None, "Stage 1 workdir (checkpoints, logs, data).")
flags.DEFINE_string("output", experiment.ASSET, "Where to write the weights file.")

if __name__ == "__main__":
  app.run(experiment.main)
