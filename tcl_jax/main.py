r"""Trains TCL.

  python -m tcl_jax.main --config=configs/synthetic.py --workdir=/tmp/tcl_synth
  python -m tcl_jax.main --config=configs/tcl.py --workdir=DIR --config.batch_size=512

Restarting with the same --workdir resumes from its latest checkpoint. On multi-host systems run
the same command on every host with --config.distributed.initialize=True (launch/).
Mistakes end in one `error: ...` line: exit status 2 for the command line, 1 for a failed run
(tcl_jax/config_files.py).
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tcl_jax import config_files

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    config_files.usage_error(f"unexpected arguments {argv[1:]} (flags are --config, --workdir "
                             "and --config.<field>=value)")
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    config_files.usage_error(f"--workdir={FLAGS.workdir} is a file; give a directory (it is "
                             "created if missing)")
  config_files.quiet_orbax_info()

  # TF (input pipeline) must not grab accelerator memory that JAX needs.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")

  from tcl_jax import sharding  # pylint: disable=g-import-not-at-top
  # Before anything touches the devices.
  sharding.maybe_initialize_distributed(FLAGS.config.get("distributed"))

  import jax  # pylint: disable=g-import-not-at-top
  from tcl_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    if FLAGS.config.get("miniature"):  # configs/synthetic.py: baseline, TCL, report
      from tcl_jax import miniature  # pylint: disable=g-import-not-at-top
      miniature.run(FLAGS.config, FLAGS.workdir)
    else:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.NonFiniteLossError, ValueError, OSError) as e:
    # Bad config values, missing files, unusable checkpoints, a NaN: one line, exit status 1
    # (the traceback with --verbosity=1).
    logging.debug("traceback", exc_info=True)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=config_files.parse_flags)
