"""tcl_jax's own model files: converted checkpoint directories (config.json + orbax params), one-file
safetensors exports, and the parameters of a training workdir. `tcl_jax.weights.loading.load_any` reads
these and every PyTorch / Hugging Face form.

Each file records its model kind ("model_kind": "tcl" or "code", in config.json and in an export's
`tcl_jax_config` metadata, beside the model config's fields); a file without one is TCL (every file
written before kinds were recorded), so it loads as it always did."""

import json
import logging
import os
import sys
from typing import Optional

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy

from tcl_jax.models import code as code_lib
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.train import checkpointing


class ConversionError(ValueError):
  """A checkpoint that does not fit the model; the one-line message lists the problems."""


def listing(problems, limit=12):
  more = f"; ... and {len(problems) - limit} more" if len(problems) > limit else ""
  return "; ".join(problems[:limit]) + more


def unflatten(flat: dict) -> dict:
  tree = {}
  for names, arr in flat.items():
    d = tree
    for n in names[:-1]:
      d = d.setdefault(n, {})
    d[names[-1]] = jnp.asarray(arr)
  return tree


def read_json(path, quiet=False) -> dict:
  try:
    with open(path) as f:
      d = json.load(f)
  except OSError as e:
    if quiet:
      return {}
    raise OSError(f"cannot read {path}: {e.strerror or e}") from None
  except ValueError as e:
    if quiet:
      return {}
    raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
  if not isinstance(d, dict):
    if quiet:
      return {}
    raise ValueError(f"{path} holds no JSON object; the checkpoint is damaged")
  return d


def is_converted(directory) -> bool:
  """A directory written by `save_checkpoint` (config.json + params/)."""
  return os.path.isfile(os.path.join(directory, "config.json")) and os.path.isdir(
    os.path.join(directory, "params")
  )


# ----------------------------------------------------------------------------------------------
# tcl_jax checkpoint directories (config.json + orbax params) and one-file safetensors exports
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Model kinds: which config class and parameter tree a file holds
# ----------------------------------------------------------------------------------------------

KIND_KEY = "model_kind"
DEFAULT_KIND = "tcl"  # what a file that records no kind holds


def _kinds() -> dict:
  """name -> (config class, init_params(cfg, rng, clip_params=None)), looked up at call time."""
  return {
    "tcl": (tcl_lib.TCLConfig, tcl_lib.init_params),
    "code": (code_lib.CoDeConfig, code_lib.init_params),
  }


def model_kind(cfg) -> str:
  """The kind a model config is of ("tcl", "code"). By exact class: CoDeConfig subclasses
  TCLConfig, so an isinstance test would call every CoDe config TCL."""
  for name, (config_type, _) in _kinds().items():
    if type(cfg) is config_type:  # pylint: disable=unidiomatic-typecheck
      return name
  raise TypeError(f"no tcl_jax checkpoint kind holds a {type(cfg).__name__} model config")


def config_to_dict(cfg) -> dict:
  """The model config as a file records it: its kind, then its fields."""
  return {KIND_KEY: model_kind(cfg), **cfg.to_dict()}


def config_from_dict(d: dict, where: str):
  """A recorded model config (`config_to_dict`'s, or one without a kind: TCL) -> the config of its
  kind. One-line ValueError naming `where` for an unknown kind or fields that do not fit it."""
  d = dict(d)
  kind = d.pop(KIND_KEY, DEFAULT_KIND)
  kinds = _kinds()
  if kind not in kinds:
    raise ValueError(
      f"{where} records model_kind {kind!r}; tcl_jax loads checkpoints of kinds "
      f"{', '.join(sorted(kinds))}"
    )
  try:
    return kinds[kind][0].from_dict(d)
  except (TypeError, ValueError, KeyError) as e:
    of_kind = "" if kind == DEFAULT_KIND else f" of kind {kind!r}"
    raise ValueError(
      f"{where} is not a tcl_jax model config{of_kind} ({e}); the checkpoint is damaged "
      f"or from another program"
    ) from None


def init_params(cfg, rng, clip_params: Optional[dict] = None) -> dict:
  """Fresh parameters of the model `cfg` describes, whatever its kind."""
  return _kinds()[model_kind(cfg)][1](cfg, rng, clip_params=clip_params)


def param_shapes(cfg):
  """The parameter tree of `cfg`'s model, as shapes and dtypes (nothing is computed)."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def save_checkpoint(directory, cfg: tcl_lib.TCLConfig, params) -> None:
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), params, force=True)
  tmp = os.path.join(directory, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(config_to_dict(cfg), f, indent=1)
  os.replace(tmp, os.path.join(directory, "config.json"))


def _root_cause(e: BaseException) -> str:
  """The innermost cause's first line (orbax wraps tensorstore's reason in pages of spec)."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return first[:300]


def _drop_closed_loop_callbacks() -> None:
  """After a failed orbax restore, tensorstore still completes the other reads in flight and calls
  back into the event loop that orbax has already closed; each callback's RuntimeError('Event
  loop is closed') reaches sys.unraisablehook, which prints a traceback for every one (dozens,
  after the error line). Drop exactly those, for the rest of the process; every other unraisable
  exception goes to the previous hook as before."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


class _UnretrievedReadErrors(logging.Filter):
  """The other way the same leftovers surface (seen on a slower machine): the failed reads'
  futures are garbage-collected with their errors unread, and asyncio logs "Future/Task exception
  was never retrieved" with a traceback for each. Drops exactly those whose error names a params/
  directory that `load_checkpoint` read (registered before the restore, as the collection can come
  before the failure reaches its except clause; a restore that succeeds leaves no such errors)."""

  PREFIXES = ("Future exception was never retrieved", "Task exception was never retrieved")

  def __init__(self):
    super().__init__()
    self.directories = set()

  def filter(self, record):
    message = record.getMessage()
    if not message.startswith(self.PREFIXES):
      return True
    text = message + (str(record.exc_info[1]) if record.exc_info else "")
    return not any(d in text for d in self.directories)


_UNRETRIEVED = _UnretrievedReadErrors()
logging.getLogger("asyncio").addFilter(_UNRETRIEVED)


def _this_process_only() -> ocp.options.MultiprocessingOptions:
  """orbax options for a read by this process alone. In a multi-process run every process reads
  the same files on its own: orbax's default barriers after a restore would make one process's
  failure a timeout in the others (tcl_jax.sharding.in_every_process reports it instead)."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _as_host_arrays(target):
  """Restore arguments that read every leaf as a numpy array: no jax device is involved, so no
  process reads onto (or waits for) another's devices. The caller places the result."""
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)


def _mismatch(tree, target) -> list:
  """How `tree` (arrays or orbax's ArrayMetadata) differs from the config's shapes `target`."""
  have = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
  problems = [f"missing {k}" for k in want if k not in have]
  problems += [f"unexpected {k}" for k in have if k not in want]
  for k, t in want.items():
    x = have.get(k)
    if x is not None and (tuple(x.shape) != tuple(t.shape) or np.dtype(x.dtype) != t.dtype):
      problems.append(
        f"{k} is {np.dtype(x.dtype)}{list(x.shape)}, the config implies {t.dtype}{list(t.shape)}"
      )
  return problems


def _on_local_device(params, target, where: str):
  """Restored host arrays, checked against the config's shapes, on this process's first device
  (where every other checkpoint form's arrays land: jnp.asarray's default device)."""
  problems = _mismatch(params, target)
  if problems:
    raise ConversionError(f"{where} does not match its config: {listing(problems)}")
  return jax.device_put(params, jax.local_devices()[0])


def load_checkpoint(directory):
  """A directory written by `save_checkpoint` (or `python -m tcl_jax.convert`) -> (cfg, params),
  read by this process alone (any process of a multi-process run; no barrier) onto its first
  local device.

  A damaged one (a file under params/ missing or truncated, a broken config.json) raises one
  ValueError naming the directory."""
  directory = os.path.abspath(directory)
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(
      f"{directory} is not a tcl_jax checkpoint (no config.json); convert a "
      f"PyTorch file first: python -m tcl_jax.convert SRC --output DIR"
    )
  cfg = config_from_dict(read_json(cfg_path), cfg_path)
  target = param_shapes(cfg)
  params_dir = os.path.join(directory, "params")
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(
      f"{directory} is not a complete tcl_jax checkpoint: it has no params/; convert it again"
    )
  # Before the restore: the callbacks can come before a failure reaches the except clause.
  _drop_closed_loop_callbacks()
  _UNRETRIEVED.directories.add(params_dir)
  options = _this_process_only()
  params, problems = None, []
  try:
    handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=options)
    with ocp.Checkpointer(handler, multiprocessing_options=options) as ckptr:
      # orbax's record of the saved tree (_METADATA): without it the copy is incomplete.
      problems = _mismatch(handler.metadata(epath.Path(params_dir)).tree, target)
      if not problems:
        restore_args = _as_host_arrays(target)
        params = ckptr.restore(
          params_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
  except Exception as e:  # pylint: disable=broad-except
    # orbax/tensorstore raise plain Exceptions whose text spans pages; one line is what helps.
    # What fails here is a file read, the same in one process as in many.
    raise ValueError(
      f"the checkpoint {directory} is damaged: its params/ cannot be read "
      f"({_root_cause(e)}); convert or copy it again"
    ) from None
  if problems:
    raise ConversionError(
      f"the checkpoint {directory} does not match its config.json: {listing(problems)}"
    )
  return cfg, _on_local_device(params, target, f"the checkpoint {directory}")


def save_safetensors(path, cfg: tcl_lib.TCLConfig, params) -> None:
  """Every parameter (frozen CLIP towers included) into one safetensors file, keyed by its flax
  path joined with '/', and the model config as JSON in the file's metadata."""
  tensors = {
    "/".join(p.key for p in path_): np.array(x, order="C")
    for path_, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  metadata = {"format": "tcl_jax", "tcl_jax_config": json.dumps(config_to_dict(cfg))}
  path = os.fspath(path)
  tmp = path + ".tmp"
  safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
  os.replace(tmp, path)


def load_safetensors(path):
  """A file written by `save_safetensors` (`python -m tcl_jax.export`) -> (cfg, params), bitwise
  as saved. A truncated, foreign or mismatched file raises one ValueError naming it."""
  path = os.fspath(path)
  try:
    with safetensors.safe_open(path, framework="np") as f:
      meta = f.metadata() or {}
      if "tcl_jax_config" not in meta:
        hint = (
          "a transformers CLIP's weights? give its directory (with config.json) instead"
          if any(k.startswith("vision_model.") for k in f.keys())
          else "export one with python -m tcl_jax.export CKPT --output model.safetensors"
        )
        raise ValueError(
          f"{path} is not a tcl_jax checkpoint: its safetensors metadata has no "
          f"tcl_jax_config ({hint})"
        )
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except safetensors.SafetensorError as e:
    raise ValueError(
      f"{path} is not a readable safetensors file ({e}); truncated or damaged? export it again"
    ) from None
  try:
    raw = json.loads(meta["tcl_jax_config"])
  except ValueError as e:
    raise ValueError(f"{path}: its tcl_jax_config metadata is not valid JSON ({e})") from None
  cfg = config_from_dict(raw, f"the tcl_jax_config metadata of {path}")
  shapes = param_shapes(cfg)
  flat, problems = {}, []
  for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(k.key for k in p)
    key = "/".join(names)
    if key not in tensors:
      problems.append(f"missing tensor {key}")
      continue
    arr = tensors.pop(key)
    if arr.shape != leaf.shape or arr.dtype != leaf.dtype:
      problems.append(
        f"tensor {key} is {arr.dtype}{list(arr.shape)}, the config implies "
        f"{leaf.dtype}{list(leaf.shape)}"
      )
    else:
      flat[names] = arr
  problems += [f"unexpected tensor {k}" for k in sorted(tensors)]
  if problems:
    raise ConversionError(
      f"{path} does not match its own config: {len(problems)} problem(s): {listing(problems)}"
    )
  return cfg, unflatten(flat)


def is_tcl_jax_safetensors(path) -> bool:
  """Whether `path` is a safetensors file with tcl_jax metadata (cheap: reads the header)."""
  try:
    with safetensors.safe_open(os.fspath(path), framework="np") as f:
      return "tcl_jax_config" in (f.metadata() or {})
  except (safetensors.SafetensorError, OSError):
    return False


def load_training_checkpoint(workdir, step: Optional[int] = None):
  """Parameters of a training run: `<workdir>/config.json` (its `model` section) and the orbax
  train state at `step` (default: the latest) -> (cfg, params)."""
  workdir = os.path.abspath(workdir)
  config_path = checkpointing.config_path(workdir)
  run = read_json(config_path)
  model = run.get("model")
  if not model:
    raise ValueError(f"{config_path} has no 'model' section")
  # A run's kind is its config's top-level model_kind (tcl_jax.kinds.build_model), default TCL.
  cfg = config_from_dict(
    {**model, KIND_KEY: run.get(KIND_KEY) or DEFAULT_KIND},
    f"the 'model' section of {config_path}",
  )
  ckpt_dir = checkpointing.checkpoints_dir(workdir)
  # This process alone, reading only (every process of a multi-process run does the same).
  options = ocp.CheckpointManagerOptions(
    read_only=True, create=False, multiprocessing_options=_this_process_only()
  )
  with ocp.CheckpointManager(ckpt_dir, options=options, item_names=checkpointing.ITEMS) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint yet")
    # Restore only the parameters (not the optimizer state) into the model's shapes.
    target = param_shapes(cfg)
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item={"params": target},
          restore_args=_as_host_arrays({"params": target}),
          partial_restore=True,
        )
      ),
    )
  params = restored["state"]["params"]
  return cfg, _on_local_device(params, target, f"the step {step} checkpoint of {workdir}")
