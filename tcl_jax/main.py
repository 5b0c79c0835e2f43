r"""Trains TCL.

  python -m tcl_jax.main --config=configs/synthetic.py --workdir=/tmp/tcl_synth
  python -m tcl_jax.main --config=configs/tcl.py --workdir=DIR --config.batch_size=512

Restarting with the same --workdir resumes from its latest checkpoint. On multi-host systems run
the same command on every host with --config.distributed.initialize=True (launch/).
Mistakes end in one `error: ...` line: exit status 2 for the command line, 1 for a failed run
(tcl_jax/cli/config_files.py).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tcl_jax.cli import config_checks
from tcl_jax.cli import config_files
from tcl_jax.miniature import record as miniature_record
from tcl_jax.train import init_dims
from tcl_jax.train import workdir_lock

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def check_before_work(config, workdir: str) -> None:
  """Usage errors found from the config and the files alone (exit status 2, one line): values
  were checked by parse_flags; here the workdir, the files the run reads, and for the miniature
  whether the workdir was made by the same settings."""
  problem = (
    config_checks.workdir_problem(workdir)
    or config_checks.path_problem(config, os.path.abspath(workdir), config_files.resolve)
    or config_checks.eval_data_problem(config, os.path.abspath(workdir))
  )
  if not problem:
    problem = _take_init_dims(config, os.path.abspath(workdir))
  if not problem and config.get("miniature"):
    problem = miniature_record.problem(config, os.path.abspath(workdir), config_files.resolve)
  if problem:
    config_files.usage_error(problem)


def _take_init_dims(config, workdir: str) -> str | None:
  """config.model's dims from a tcl_jax init checkpoint where the command line leaves them
  (tcl_jax.train.init_dims); the problem of a flag that contradicts it."""
  init = config.get("init_checkpoint")
  if not init or "://" in init:
    return None
  path = init.replace("{workdir}", workdir)
  taken, problem = init_dims.adopt(config, path, config_files.overrides(sys.argv))
  if taken:
    logging.info("config.model from init_checkpoint %s: %s", init, ", ".join(taken))
  return problem


def _process_index(config) -> int | None:
  """This process's index when the config says it (None: jax.distributed detects it)."""
  dist = config.get("distributed")
  if not dist or not dist.get("initialize", False):
    return 0
  index = dist.get("process_id", -1)
  return index if index >= 0 else None


def lock_workdir(workdir: str, process_index: int) -> None:
  """One run per workdir (tcl_jax.train.workdir_lock): a second is refused in one line, exit status 2,
  before it writes anything."""
  problem = workdir_lock.acquire(os.path.abspath(workdir), process_index)
  if problem:
    config_files.usage_error(problem)


def main(argv):
  if len(argv) > 1:
    config_files.usage_error(
      f"unexpected arguments {argv[1:]} (flags are --config, --workdir and --config.<field>=value)"
    )
  config, workdir = FLAGS.config, FLAGS.workdir
  check_before_work(config, workdir)
  process_index = _process_index(config)
  if process_index is not None:
    lock_workdir(workdir, process_index)
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

  if process_index is None:
    lock_workdir(workdir, jax.process_index())
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
    _train(config, workdir, train)
  except SystemExit as e:
    _end_if_reads_blocked(e.code, preemption)
    raise
  _end_if_reads_blocked(0, preemption)


def _end_if_reads_blocked(code, preemption) -> None:
  """Ends the process now, without Python's exit, when a read abandoned by a stop request is
  still blocked in the input pipeline's native code (a stalled file system): its return during
  interpreter exit would abort the process (preemption.reads_blocked). Everything is saved and
  the writers are closed by then."""
  if not preemption.reads_blocked():
    return
  if isinstance(code, str):
    print(code, file=sys.stderr)
  logging.warning("An input read is still blocked: ending the process without Python's exit.")
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1 if isinstance(code, str) else code or 0)  # pylint: disable=protected-access


def _train(config, workdir, train):
  from tcl_jax.train import preemption  # pylint: disable=g-import-not-at-top

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
