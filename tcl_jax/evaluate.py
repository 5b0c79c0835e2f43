"""Zero-shot open-vocabulary segmentation evaluation, the command line (the engine is
tcl_jax.zeroshot):

    python -m tcl_jax.evaluate --config=configs/eval.py --checkpoint=DIR --workdir=OUT

writes OUT/results.json = {"<task>": {"miou", "per_class_iou", "num_images", "num_skipped"}, ...,
"average"} (percent). The protocol is the original's (zeroshot.pipeline, shared/EVAL_PROTOCOL.md).
"""

import functools
import json
import logging
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from tcl_jax import kinds
from tcl_jax import sharding
from tcl_jax import zeroshot
from tcl_jax.cli import config_checks
from tcl_jax.cli import config_files
from tcl_jax.train import checkpointing
from tcl_jax.weights import loading
from tcl_jax.zeroshot import datasets
from tcl_jax.zeroshot import evaluator
from tcl_jax.zeroshot import report


def _define_flags():
  if "checkpoint" in flags.FLAGS:
    return
  config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file (default: configs/eval.py).", lock_config=True
  )
  flags.DEFINE_string(
    "checkpoint",
    None,
    "A converted tcl_jax checkpoint directory, a training "
    "workdir (its latest step), a PyTorch TCL file, a .safetensors export or "
    "a Hugging Face Hub id.",
  )
  flags.DEFINE_string("workdir", None, "Folder for results.json.")


def config_for_checkpoint(config, checkpoint: str, given: set):
  """`config` with, for a training workdir, the run's own evaluation settings (config.json's
  `evals`: tasks, data_root, img_scale, crop, stride, ...) in place of those not `given` on the
  command line, so that evaluating a run reproduces its training-time numbers without flags."""
  if not checkpointing.is_training_workdir(checkpoint):
    return config
  path = checkpointing.config_path(checkpoint)
  with open(path) as f:
    evals = json.load(f).get("evals") or {}
  config = config.copy_and_resolve_references()
  taken = []
  for k, v in evals.items():
    if k in config and k not in given and v not in ("", None):
      if k == "data_root":  # as the training loop expands it
        v = checkpointing.expand_workdir(v, os.path.abspath(checkpoint))
      v = type(config[k])(v) if isinstance(config[k], tuple) else v
      if v != config[k]:
        config[k] = v
        taken.append(f"{k}={v}")
  if taken:
    logging.info("From %s: %s", path, ", ".join(taken))
  return config


def main(argv):
  # Usage errors are answered before any data or model is read (tests/test_cli_errors.py).
  FLAGS = flags.FLAGS
  config_files.quiet_startup()  # no INFO lines about backends that are not here (TPU, proxy)
  if len(argv) > 1:
    config_files.usage_error(f"unexpected arguments {argv[1:]}")
  if not FLAGS.checkpoint:
    config_files.usage_error(
      "--checkpoint is required (a converted checkpoint directory, a "
      "training workdir or a PyTorch TCL file)"
    )
  config_files.quiet_orbax_info()
  given = {f.split(".")[0] for f in config_files.overrides(sys.argv)}
  # Several processes (a pod slice, a SLURM job): every process runs this command and evaluates
  # its share of each benchmark; process 0 prints and writes the merged results. Each checks its
  # own files and reads its own copy of the checkpoint; a mistake in one stops all of them at once,
  # each with one line (not a timeout in the others).
  sharding.maybe_initialize_distributed(FLAGS.config.get("distributed"))
  try:
    config, methods, protocols, tasks, params, models = sharding.in_every_process(
      lambda: _prepare(FLAGS.config, given, FLAGS.checkpoint, FLAGS.workdir),
      "the evaluation's setup",
    )
  except (_UsageError, sharding.OtherProcessFailed) as e:
    config_files.usage_error(str(e))
  # This host's devices (several local devices: its windows split over them).
  mesh = sharding.local_mesh()
  grid = []
  for p in protocols:
    protocol = zeroshot.Protocol.from_config(config, p, given)
    done = {}
    for key, model in models.items():
      labels = None
      if len(methods) > 1 or len(protocols) > 1:  # a grid: its lines name their cell
        heads = key if isinstance(key, tuple) else (key,)
        labels = [f"method {m or 'own'}, protocol {p}" for m in heads]
      results = zeroshot.evaluate_tasks(
        model, params, tasks, protocol, mesh=mesh, progress=True, labels=labels
      )
      done.update(zip(key, results) if isinstance(key, tuple) else [(key, results)])
    grid += [{"method": m or "own", "protocol": p, "results": done[m]} for m in methods]
  if jax.process_index() != 0:
    return
  if len(grid) == 1:  # one model, one protocol: the per-class tables and the flat results.json
    results = grid[0]["results"]
    for t, r in results.items():
      if t != "average":
        print(report.format_task_table(t, r))
        print()
    print(report.format_summary(results))
  else:
    results = {"grid": grid}
    print(report.format_grid(grid))
  if FLAGS.workdir:
    try:
      print(f"wrote {report.write_results(results, FLAGS.workdir)}")
    except OSError as e:  # the workdir changed since the check; the results are printed above
      print(f"error: cannot write results.json in {FLAGS.workdir}: {e}", file=sys.stderr)
      sys.exit(1)
  sys.stdout.flush()


class _UsageError(ValueError):
  """A mistake found before any work starts: one line, exit status 2."""


def _prepare(config, given: set, checkpoint: str, workdir: str | None):
  """(config, methods, protocols, tasks, params, models), checked before any work starts; a
  mistake raises _UsageError."""
  if not os.path.exists(checkpoint) and loading.hub_repo_id(checkpoint) is None:
    raise _UsageError(f"--checkpoint={checkpoint} does not exist")
  problem = loading.directory_problem(checkpoint)  # before the data: it is named first
  if problem:
    raise _UsageError(f"--checkpoint={problem}")
  config = config_for_checkpoint(config, checkpoint, given)
  problem = config_checks.eval_value_problem(config)  # also the values a workdir supplied
  if problem:
    raise _UsageError(problem)
  try:
    methods, protocols = grid_axes(config)
  except ValueError as e:
    raise _UsageError(str(e)) from None
  try:
    # Check every task's data before loading the model.
    tasks = zeroshot.open_datasets(config.tasks, config.data_root, config.max_images)
  except (datasets.DataError, ValueError) as e:
    raise _UsageError(str(e)) from None
  for p in protocols:  # each protocol's class names for each task (SCLIP's: the 8 benchmarks)
    protocol = zeroshot.Protocol.from_config(config, p, given)
    try:
      for t, ds in tasks.items():
        evaluator.task_queries(ds.spec, protocol.for_task(t))
    except ValueError as e:
      raise _UsageError(f"--config.protocol={p}: {e}") from None
  # The training-free methods of the grid run as one model with a head each: the CLIP forward
  # they share is computed once per window (kinds.zero_shot_methods).
  free = [m for m in methods if m in kinds.METHODS]
  try:
    cfg, params = loading.load_any(checkpoint)
    models = {m: kinds.zero_shot_model(cfg, m) for m in methods if m not in free}
    if len(free) > 1:
      models[tuple(free)] = kinds.zero_shot_methods(free, cfg)
    elif free:
      models[free[0]] = kinds.zero_shot_model(cfg, free[0])
  except (ValueError, OSError) as e:
    raise _UsageError(f"cannot load checkpoint {checkpoint}: {e}") from None
  # Before any evaluation: results.json is written only at the end (was: a traceback after it
  # all). Only process 0 writes it, so only it checks; without creating the workdir, so that a
  # setup that fails in another process leaves nothing behind.
  problem = (
    workdir and jax.process_index() == 0 and config_checks.workdir_problem(workdir, create=False)
  )
  if problem:
    raise _UsageError(problem)
  return config, methods, protocols, tasks, params, models


def grid_axes(config) -> tuple:
  """(methods, protocols) of `--config.method` / `--config.protocol` (comma-separated); a
  ValueError (one line) for an unknown name. Method "" is the checkpoint's own model."""
  methods = [m.strip() for m in str(config.get("method", "") or "").split(",")]
  methods = [("" if m == "own" else m) for m in methods if m or len(methods) == 1]
  known = ("tcl",) + tuple(kinds.METHODS)
  for m in methods:
    if m and m not in known:
      raise ValueError(f"unknown --config.method {m!r}; known: own, {', '.join(known)}")
  protocols = [p.strip() for p in str(config.get("protocol", "tcl") or "tcl").split(",")]
  protocols = [p for p in protocols if p]
  for p in protocols:
    if p not in zeroshot.PROTOCOLS:
      raise ValueError(f"unknown --config.protocol {p!r}; known: {', '.join(zeroshot.PROTOCOLS)}")
  return list(dict.fromkeys(methods)) or [""], list(dict.fromkeys(protocols)) or ["tcl"]


def run():
  _define_flags()
  app.run(
    main, flags_parser=functools.partial(config_files.parse_flags, default_config="configs/eval.py")
  )


if __name__ == "__main__":
  run()
