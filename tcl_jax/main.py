r"""Trains TCL.

  python -m tcl_jax.main --config=configs/synthetic.py --workdir=/tmp/tcl_synth
  python -m tcl_jax.main --config=configs/tcl.py --workdir=DIR --config.batch_size=512

Restarting with the same --workdir resumes from its latest checkpoint. On multi-host systems run
the same command on every host with --config.distributed.initialize=True (launch/).
Mistakes end in one `error: ...` line: exit status 2 for the command line, 1 for a failed run
(tcl_jax/cli/config_files.py).
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tcl_jax.cli import config_checks
from tcl_jax.cli import config_files
from tcl_jax.miniature import record as miniature_record

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def check_before_work(config, workdir: str) -> None:
  """Usage errors found from the config and the files alone (exit status 2, one line): values
  were checked by parse_flags; here the workdir, the files the run reads, and for the miniature
  whether the workdir was made by the same settings."""
  problem = config_checks.workdir_problem(workdir) or config_checks.path_problem(
    config, os.path.abspath(workdir), config_files.resolve
  )
  if not problem and config.get("miniature"):
    problem = miniature_record.problem(config, os.path.abspath(workdir), config_files.resolve)
  if problem:
    config_files.usage_error(problem)


def main(argv):
  if len(argv) > 1:
    config_files.usage_error(
      f"unexpected arguments {argv[1:]} (flags are --config, --workdir and --config.<field>=value)"
    )
  config, workdir = FLAGS.config, FLAGS.workdir
  check_before_work(config, workdir)
  if config.get("miniature"):
    stored = miniature_record.finished(os.path.abspath(workdir))
    if stored is not None:  # a finished run of the same settings: its figures, not a re-run
      print(
        miniature_record.report_line(
          stored, stored.get("tcl_steps", config.total_steps), os.path.abspath(workdir), stored=True
        ),
        flush=True,
      )
      return
  config_files.quiet_orbax_info()
  config_files.quiet_startup()

  # TF (input pipeline) must not grab accelerator memory that JAX needs.
  with config_files.quiet_native_stderr():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")

  from tcl_jax import sharding  # pylint: disable=g-import-not-at-top

  # Before anything touches the devices.
  sharding.maybe_initialize_distributed(config.get("distributed"))

  import jax  # pylint: disable=g-import-not-at-top

  from tcl_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  from tcl_jax.train import preemption  # pylint: disable=g-import-not-at-top

  logging.info(
    "JAX %s, process %d/%d, devices: %s",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.devices(),
  )
  try:
    if config.get("miniature"):  # configs/synthetic.py: baseline, TCL, report
      from tcl_jax.miniature import experiment as miniature  # pylint: disable=g-import-not-at-top

      miniature.run(config, workdir)
    else:
      train.train_and_evaluate(config, workdir)
  except preemption.Interrupted as e:  # Ctrl-C: saved; one line, the shell's status for SIGINT
    print(f"stopped: {e}", flush=True)
    raise SystemExit(130) from None
  except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of the steps since the last one
    raise SystemExit("error: aborted (second Ctrl-C); the last checkpoint is kept") from None
  except (train.NonFiniteLossError, ValueError, OSError) as e:
    # Bad config values, missing files, unusable checkpoints, a NaN: one line, exit status 1
    # (the traceback with --verbosity=1).
    logging.debug("traceback", exc_info=True)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=config_files.parse_flags)
