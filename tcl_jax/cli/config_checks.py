"""Checks of a parsed config and of the paths it names, made before any work starts.

Each function returns the one line that explains the first problem (None when there is none); the
command-line programs print it as `error: ...` with exit status 2 (config_files.usage_error). Only
the standard library is used, so the checks answer before TensorFlow or JAX is imported.

  value_problem(config)          numeric fields out of range: a training config (configs/tcl.py,
                                 synthetic.py, ...) or an evaluation config (configs/eval.py);
                                 config_files.parse_flags runs it on every parsed --config.
  eval_value_problem(config)     the evaluation fields alone (evaluate's merged config).
  workdir_problem(workdir)       a --workdir that is a file, cannot be created or is not writable.
  path_problem(config, workdir)  an init checkpoint or miniature CLIP file that does not exist.
  eval_data_problem(config, workdir)  a training config's evaluation data that is missing.
"""

import math
import numbers
import os
import tempfile

# (field, kind, low, high): kind "int" (a whole number, not a bool) or "float"; None = unbounded.
# Fields a config does not have are skipped.
_EVAL_RULES = (
  ("bg_thresh", "float", 0.0, 1.0),
  ("kp_w", "float", 0.0, None),
  ("max_images", "int", 0, None),
  ("crop", "int", 1, None),
  ("stride", "int", 1, None),
  ("batch", "int", 1, None),
  ("class_pad", "int", 0, None),
)
_TRAIN_RULES = (
  ("total_steps", "int", 1, None),
  ("batch_size", "int", 1, None),
  ("seed", "int", 0, None),
  ("log_every_steps", "int", 1, None),
  ("checkpoint_every_steps", "int", 0, None),
  ("eval_every_steps", "int", 0, None),
  ("image_log_every_steps", "int", 0, None),
  ("image_log_num", "int", 0, None),
  ("input.image_size", "int", 1, None),
  ("input.num_nouns", "int", 0, None),  # CoDe batches' nouns per caption (0: TCL batches)
  ("optim.base_lr", "float", 0.0, None),
  ("optim.min_lr", "float", 0.0, None),
  ("optim.lr_scale_reference_batch", "int", 0, None),
  ("optim.warmup_steps", "int", 0, None),
  ("optim.warmup_start_factor", "float", 0.0, 1.0),
  ("optim.ust_steps", "int", 0, None),
  ("optim.weight_decay", "float", 0.0, None),
  ("optim.clip_grad", "float", 0.0, None),
  ("model.caption_chunk", "int", 1, None),
  ("model.n_ctx", "int", 1, None),
  ("checkpoint.keep", "int", 1, None),
  ("checkpoint.keep_best", "int", 0, None),
  ("synthetic.num_train_examples", "int", 1, None),
  ("synthetic.image_size", "int", 1, None),
  ("synthetic.num_shards", "int", 1, None),
  ("synthetic.seed", "int", 0, None),
  ("synthetic.num_eval_images", "int", 0, None),
  ("miniature.clip_steps", "int", 0, None),
  ("miniature.num_mask_images", "int", 0, None),
) + tuple((f"evals.{f}", kind, lo, hi) for f, kind, lo, hi in _EVAL_RULES)


def _get(config, path: str):
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _rule_problem(value, field: str, kind: str, lo, hi, flag: str) -> str | None:
  if kind == "int":
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    what = "a whole number"
  else:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    what = "a number"
  if ok and (lo is None or value >= lo) and (hi is None or value <= hi):
    return None
  if lo is not None and hi is not None:
    want = f"{what} in [{lo}, {hi}]"
  elif lo is not None:
    want = f"{what} >= {lo}"
  else:
    want = what
  return f"{flag}.{field} must be {want}, got {value!r}"


def _scale_problem(value, field: str, flag: str) -> str | None:
  if (
    isinstance(value, (tuple, list))
    and len(value) == 2
    and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value)
  ):
    return None
  return f"{flag}.{field} must be two whole numbers >= 1 (long side, short side), got {value!r}"


def _problem(config, rules, scale_field: str, flag: str) -> str | None:
  for field, kind, lo, hi in rules:
    value = _get(config, field)
    if value is not _MISSING:
      problem = _rule_problem(value, field, kind, lo, hi, flag)
      if problem:
        return problem
  value = _get(config, scale_field)
  if value is not _MISSING:
    return _scale_problem(value, scale_field, flag)
  return None


def eval_value_problem(config, flag: str = "config") -> str | None:
  """The first out-of-range field of an evaluation config (configs/eval.py's fields), or None."""
  return _problem(config, _EVAL_RULES, "img_scale", flag)


def value_problem(config, flag: str = "config") -> str | None:
  """The first out-of-range numeric field of a training config (with its `evals` group) or of
  an evaluation config, or None."""
  if not hasattr(config, "keys"):
    return None
  if "total_steps" in config:
    return _problem(config, _TRAIN_RULES, "evals.img_scale", flag) or _kind_problem(config, flag)
  return eval_value_problem(config, flag)


def _kind_problem(config, flag: str) -> str | None:
  """A CoDe run whose batches would carry no nouns (a TCL config with model_kind=code)."""
  if config.get("model_kind", "tcl") != "code":
    return None
  nouns = _get(config, "input.num_nouns")
  if nouns is _MISSING or not nouns:
    return (
      f"--{flag}.model_kind=code trains on each caption's nouns: set --{flag}.input.num_nouns=2 "
      "(the authors' num_words) or start from configs/code.py"
    )
  return None


def workdir_problem(workdir: str, flag: str = "--workdir", create: bool = True) -> str | None:
  """Why `workdir` cannot hold a run's output (None: it can). Creates it when missing, unless
  `create` is False: then the nearest folder that exists must take a file (nothing is left)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    return f"{flag}={workdir} is a file; give a directory (it is created if missing)"
  try:
    probe = workdir
    if create:
      os.makedirs(workdir, exist_ok=True)
    else:
      while not os.path.isdir(probe) and os.path.dirname(os.path.abspath(probe)) != probe:
        probe = os.path.dirname(os.path.abspath(probe))
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    return (
      f"{flag}={workdir} is not writable ({e.strerror or e}); give a directory you can write to"
    )
  return None


def _local(path: str) -> bool:
  return bool(path) and "://" not in path


def path_problem(config, workdir: str, resolve=lambda p: p) -> str | None:
  """An input file the run would only find missing once started (init_checkpoint, the
  miniature's CLIP weights), checked up front. `resolve` maps a relative package path to its
  file (config_files.resolve)."""
  init = config.get("init_checkpoint") if hasattr(config, "keys") else None
  if init and _local(init):
    path = init.replace("{workdir}", workdir)
    if not os.path.exists(path):
      return (
        f"config.init_checkpoint={init}: {path} does not exist (a CLIP .pt, a TCL .pth, a "
        "converted directory or a training workdir; '' starts from random weights)"
      )
    if not os.access(path, os.R_OK):
      return f"config.init_checkpoint={init}: {path} is not readable"
  mini = config.get("miniature") if hasattr(config, "keys") else None
  weights = mini.get("clip_weights") if mini is not None and hasattr(mini, "keys") else None
  if weights and _local(weights):
    path = resolve(weights)
    if not os.path.isfile(path):
      return (
        f"config.miniature.clip_weights={weights}: no such file (empty: train the CLIP in the run)"
      )
  return None


def eval_data_problem(config, workdir: str) -> str | None:
  """The first task of `config.evals.tasks` whose files are missing under `config.evals.data_root`
  ({workdir} expanded), checked before training: found at the first evaluation, it would end a run
  that had trained for hours. Synthetic configs write their evaluation data at start: skipped.
  Imports the task registry (numpy, OpenCV) only when there is something to check."""
  evals = config.get("evals") if hasattr(config, "keys") else None
  tasks = evals.get("tasks") if evals is not None and hasattr(evals, "keys") else None
  if not tasks or config.get("synthetic"):
    return None
  root = str(evals.get("data_root", "data")).replace("{workdir}", workdir)
  if not _local(root):
    return None
  from tcl_jax.zeroshot import datasets  # pylint: disable=g-import-not-at-top

  names = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else tasks
  for name in names:
    try:
      spec = datasets.get_task(name)
    except ValueError as e:
      return f"config.evals.tasks: {e}"
    problem = datasets.data_problem(spec, root, flag="--config.evals.data_root")
    if problem:
      return problem + "; --config.evals.tasks= trains without evaluation"
  return None
