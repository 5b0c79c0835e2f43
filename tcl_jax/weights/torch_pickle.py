"""Read PyTorch checkpoints (``torch.save`` zip archives and TorchScript archives)
into numpy arrays without importing torch and without running pickled code.

Pickle can call any importable function, so a checkpoint is untrusted code. This
reader never imports or calls what a pickle names. Only the globals that torch's
serializer emits for tensors (rebuild helpers, storage types, dtypes,
``OrderedDict``) and a few plain values (builtin containers, numpy scalars) resolve,
each to a local re-implementation. Classes of other libraries (a training
checkpoint's OmegaConf ``config``, ``typing.Any``, ...) and TorchScript module
classes (``__torch__.*``) become inert :class:`Placeholder` classes: pickle may make
instances of them and hand them state, but can never call them. Globals of modules
that only an attack would name (``os``, ``subprocess``, ``builtins.eval``, ...) and
unknown torch globals raise :class:`UnsafeCheckpointError`.

Public API: :func:`load_state_dict`, :func:`load_pickle`, :class:`Placeholder`,
:class:`TorchScriptObject`, :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
import os
import pickle
import re
from typing import Any
import zipfile
import zlib

import numpy as np

from tcl_jax.weights import torch_unpickler
from tcl_jax.weights.torch_unpickler import Placeholder
from tcl_jax.weights.torch_unpickler import TorchScriptObject
from tcl_jax.weights.torch_unpickler import UnsafeCheckpointError

__all__ = [
  "load_state_dict",
  "load_pickle",
  "Placeholder",
  "TorchScriptObject",
  "UnsafeCheckpointError",
]


# --- archive handling -------------------------------------------------------


def _open_zip(path: str) -> zipfile.ZipFile:
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory, not a PyTorch checkpoint file")
  if zipfile.is_zipfile(path):
    try:
      return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise ValueError(f"{path}: corrupt or truncated checkpoint archive ({e})") from e
  with open(path, "rb") as f:
    head = f.read(4)
  if head[:1] == b"\x80" or head[:2] == b"PK":
    hint = (
      "legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it "
      "with torch>=1.6, e.g. `torch.save(torch.load(p, map_location='cpu'), p2)`"
      if head[:1] == b"\x80"
      else "corrupt or truncated zip archive"
    )
    raise ValueError(f"{path}: {hint}")
  raise ValueError(f"{path}: not a PyTorch zip checkpoint (corrupt, truncated, or another format)")


def _archive_prefix(z: zipfile.ZipFile, path: str) -> str:
  # torch names the top folder after the file stem, but it may be anything.
  for n in z.namelist():
    if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1):
      return n[: -len("data.pkl")]
  raise ValueError(
    f"{path}: zip archive has no data.pkl; not a torch.save/TorchScript "
    "checkpoint (very old TorchScript model.json archives are unsupported)"
  )


def _read_archive(path) -> tuple[Any, zipfile.ZipFile, str, bool]:
  path = os.fspath(path)
  z = _open_zip(path)
  try:
    prefix = _archive_prefix(z, path)
    names = set(z.namelist())
    torchscript = prefix + "constants.pkl" in names or any(
      n.startswith(prefix + "code/") for n in names
    )
    big_endian = prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() == b"big"
    cache: dict[str, torch_unpickler.Storage] = {}

    def read_storage(key: str, dtype: np.dtype, numel: int) -> torch_unpickler.Storage:
      if key not in cache:
        member = f"{prefix}data/{key}"
        if member not in names:
          raise ValueError(f"{path}: storage {member!r} missing from archive")
        raw = z.read(member)
        if len(raw) < numel * dtype.itemsize:
          raise ValueError(f"{path}: storage {member!r} is truncated")
        flat = np.frombuffer(raw, dtype=np.uint8)[: numel * dtype.itemsize]
        cache[key] = torch_unpickler.Storage(_decode(flat, dtype, big_endian))
      return cache[key]

    obj = torch_unpickler.Unpickler(
      z.read(prefix + "data.pkl"), read_storage, torchscript, path
    ).load()
    return obj, z, prefix, torchscript
  except UnsafeCheckpointError as e:
    z.close()
    raise UnsafeCheckpointError(f"{path}: {e}") from None
  except (
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    pickle.UnpicklingError,
    KeyError,
    OSError,
    TypeError,
    IndexError,
    AttributeError,
    ValueError,
  ) as e:
    z.close()
    if isinstance(e, ValueError) and str(e).startswith(path):
      raise
    raise ValueError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}: {e})") from e
  except BaseException:
    z.close()
    raise


def _decode(raw_u8: np.ndarray, dtype: np.dtype, big_endian: bool) -> np.ndarray:
  if not big_endian or dtype.itemsize == 1:
    return raw_u8.view(dtype)
  if dtype == torch_unpickler.BF16:  # ml_dtypes has no byte-swapped variant; swap as uint16
    return raw_u8.view(">u2").astype("<u2").view(torch_unpickler.BF16)
  return raw_u8.view(dtype.newbyteorder(">")).astype(dtype)


def load_pickle(path) -> Any:
  """Unpickle a checkpoint's ``data.pkl`` safely.

  Returns the raw structure (dicts / OrderedDicts / lists with numpy arrays in
  place of tensors, :class:`Placeholder` instances for other libraries' objects).
  For a TorchScript archive this is the root :class:`TorchScriptObject` of the
  module tree.
  """
  obj, z, _, _ = _read_archive(path)
  z.close()
  return obj


# --- flattening to a state dict ---------------------------------------------


def _module_slots(z: zipfile.ZipFile, prefix: str, type_name: str, cache: dict):
  """(parameters, buffers) of a TorchScript class, read as text from ``code/``.

  TorchScript source declares e.g. ``__parameters__ = ["weight", "bias", ]``; we only
  parse that literal (never execute the code). None if unavailable.
  """
  if type_name in cache:
    return cache[type_name]
  result = None
  mod, _, cls = type_name.rpartition(".")
  member = f"{prefix}code/{mod.replace('.', '/')}.py"
  try:
    src = z.read(member).decode("utf-8", "replace")
  except KeyError:
    src = ""
  m = re.search(rf"^class {re.escape(cls)}\b.*?:\n((?:[ \t]+.*\n|\s*\n)*)", src, re.M)
  if m:
    body = m.group(1)

    def names(attr):
      hit = re.search(rf"^\s*{attr}\s*=\s*(\[[^\]]*\])", body, re.M)
      return ast.literal_eval(hit.group(1)) if hit else None

    params, buffers = names("__parameters__"), names("__buffers__")
    if params is not None:
      result = (list(params), None if buffers is None else list(buffers))
  cache[type_name] = result
  return result


def _walk_script_module(obj: TorchScriptObject, prefix: str, out: dict, slots) -> None:
  """Emit tensors as ``Module.state_dict()`` does: own parameters, own buffers, then
  submodules in attribute order."""
  state = obj.state if isinstance(obj.state, dict) else {}
  decl = slots(obj.type_name)
  if decl is None:  # no declaration found: take every tensor attribute
    own = [k for k, v in state.items() if isinstance(v, np.ndarray)]
  else:
    params, buffers = decl
    tensors = [k for k, v in state.items() if isinstance(v, np.ndarray)]
    if buffers is None:  # older archives: treat other tensor attributes as buffers
      buffers = [k for k in tensors if k not in params]
    own = [k for k in params if k in tensors] + [k for k in buffers if k in tensors]
  for k in own:
    out[prefix + k] = state[k]
  for k, v in state.items():
    if isinstance(v, TorchScriptObject):
      _walk_script_module(v, f"{prefix}{k}.", out, slots)


def _flatten(obj, prefix: str, out: dict, slots) -> None:
  if isinstance(obj, np.ndarray):
    out[prefix.rstrip(".")] = obj
  elif isinstance(obj, TorchScriptObject):
    _walk_script_module(obj, prefix, out, slots)
  elif isinstance(obj, Mapping):
    for k, v in obj.items():
      _flatten(v, f"{prefix}{k}.", out, slots)
  # anything else (ints, strings, lists, optimizer state scalars) carries no weights


def _has_tensors(m) -> bool:
  return isinstance(m, Mapping) and any(isinstance(v, np.ndarray) for v in m.values())


def load_state_dict(path) -> dict[str, np.ndarray]:
  """Load a checkpoint as ``{name: numpy array}`` in stored order.

  * plain ``torch.save(state_dict)``: that dict;
  * ``torch.save({"model": sd, ...})`` / ``{"state_dict": sd}``: ``sd`` (e.g. a
    training checkpoint with optimizer state and a pickled config beside it); other
    dicts are flattened with dotted keys, dropping non-tensor values;
  * TorchScript archive: the names ``scripted_module.state_dict()`` would give.
  """
  obj, z, prefix, _ = _read_archive(path)
  try:
    if isinstance(obj, Mapping):
      for key in ("model", "state_dict"):
        if _has_tensors(obj.get(key)):
          obj = obj[key]
          break
    cache: dict = {}
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out, lambda t: _module_slots(z, prefix, t, cache))
    return out
  finally:
    z.close()
