r"""Trains TCL.

  python -m tcl_jax.main --config=configs/synthetic.py --workdir=/tmp/tcl_synth
  python -m tcl_jax.main --config=configs/tcl.py --workdir=DIR --config.batch_size=512

Restarting with the same --workdir resumes from its latest checkpoint. On multi-host systems run
the same command on every host with --config.distributed.initialize=True (launch/).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops INFO records of orbax (several lines per checkpoint step) from the console; its
  warnings and errors still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())

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
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.NonFiniteLossError as e:
    logging.error("%s", e)
    raise SystemExit(f"ERROR: {e}") from None
  except (ValueError, OSError) as e:
    # Bad config values, missing files, unusable checkpoints: one line (traceback: --verbosity=1).
    logging.debug("traceback", exc_info=True)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
