"""The restricted unpickler behind tcl_jax.weights.torch_pickle: the globals a PyTorch checkpoint may
name and what each resolves to (tensor rebuilders, plain values, inert placeholders for any
other library's objects); everything else is refused. Nothing a pickle names is imported or
called."""

import collections
import io
import pickle
from typing import Any

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(ValueError):
  """The checkpoint's pickle names a global outside the allow-list."""


# --- what the allowed globals resolve to -----------------------------------

BF16 = np.dtype(ml_dtypes.bfloat16)

# Legacy typed-storage class names (what torch.save writes in persistent ids).
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": BF16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "ComplexFloatStorage": np.complex64,
  "ComplexDoubleStorage": np.complex128,
}
# torch.<dtype> globals (may appear in tensor metadata / module state).
_TORCH_DTYPES = {
  "float32": np.float32,
  "float": np.float32,
  "float64": np.float64,
  "double": np.float64,
  "float16": np.float16,
  "half": np.float16,
  "bfloat16": BF16,
  "int64": np.int64,
  "long": np.int64,
  "int32": np.int32,
  "int": np.int32,
  "int16": np.int16,
  "short": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "bool": np.bool_,
  "complex64": np.complex64,
  "complex128": np.complex128,
}


class _StorageType:
  """Marker for a torch storage class; deliberately not callable."""

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self):
    return f"torch.{self.name}"


class Storage:
  """A flat numpy array standing in for a torch storage read from ``data/<key>``."""

  def __init__(self, flat: np.ndarray):
    self.flat = flat


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
  """Rebuild (copy) a tensor view of a storage: offset + sizes + strides in elements."""
  if not isinstance(storage, Storage):
    raise ValueError(f"tensor rebuild got {type(storage).__name__}, expected a storage")
  flat = storage.flat
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(storage_offset)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise ValueError(f"bad tensor geometry size={size} stride={stride} offset={offset}")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  # as_strided does no bounds checking: verify the view stays inside the storage,
  # otherwise a crafted file could read arbitrary process memory.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise ValueError(
      f"tensor view (size={size}, stride={stride}, offset={offset}) "
      f"exceeds its storage of {flat.size} elements"
    )
  item = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], size, tuple(s * item for s in stride))
  return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  return data  # a Parameter is just its tensor here


def _identity(x, *_):
  return x


class _Uncallable(type):
  """Metaclass of placeholder classes: pickle may create instances (NEWOBJ, then
  BUILD hands them state), but calling the class (REDUCE, INST, OBJ) is refused."""

  def __call__(cls, *args, **kwargs):
    raise UnsafeCheckpointError(
      f"refusing to call '{cls.type_name}' from the checkpoint pickle (classes of "
      "other libraries are only kept as inert placeholders; this file may be malicious)"
    )


class Placeholder(metaclass=_Uncallable):
  """Inert stand-in for an instance of a class the pickle names but we never import.

  ``type_name`` is the qualified class name; ``args`` what NEWOBJ passed; ``state``
  what pickle passed to ``__setstate__`` (usually a dict of attributes).
  """

  type_name = "?"
  args: tuple = ()
  state: Any = None

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args = args + ((kwargs,) if kwargs else ())
    return obj

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    keys = list(self.state) if isinstance(self.state, dict) else type(self.state).__name__
    return f"<{self.type_name} {keys}>"


class TorchScriptObject(Placeholder):
  """Inert stand-in for a ``__torch__.*`` TorchScript class instance; for modules,
  ``state`` is a dict of attributes, submodules and tensors."""

  type_name = "__torch__"


def _placeholder_class(qualname: str, base: type) -> type:
  return _Uncallable(qualname.rsplit(".", 1)[-1], (base,), {"type_name": qualname})


# --- plain values in a training checkpoint's other entries ------------------


def _plain_dict(default_factory=None):
  # defaultdict(f) -> dict: SETITEMS fills it; the factory is never needed to read it.
  return {}


def _latin1_bytes(text, encoding="latin1"):
  # protocol 2 writes bytes as _codecs.encode(str, "latin1"); nothing else is decoded
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise ValueError(f"unsupported bytes encoding {encoding!r}")
  return text.encode("latin-1")


def _bytes(*args):
  return _latin1_bytes(*args) if args else b""


class _NumpyDType(Placeholder):
  """numpy.dtype(spec, align, copy) + BUILD(state): only read by _numpy_scalar."""

  type_name = "numpy.dtype"


def _numpy_dtype(spec, align=False, copy=False):
  return _NumpyDType.__new__(_NumpyDType, spec)


def _numpy_scalar(dtype, data):
  """numpy's scalar(dtype, raw bytes) for numeric and bool dtypes (e.g. a np.mean metric)."""
  if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
    raise ValueError("malformed numpy scalar")
  dt = np.dtype(str(dtype.args[0]))
  if dt.kind not in "biufc" or not dt.isbuiltin:
    raise ValueError(f"unsupported numpy scalar dtype {dt}")
  order = dtype.state[1] if isinstance(dtype.state, tuple) and len(dtype.state) > 1 else "="
  if order in ("<", ">"):
    dt = dt.newbyteorder(order)
  return np.frombuffer(data, dt, count=1)[0]


# Builtin value types, as OmegaConf metadata names them (object_type=dict, ...) or as
# protocol 2 rebuilds sets and empty bytes. Calling them with pickled values is harmless.
_BUILTIN_TYPES = {
  "dict": dict,
  "list": list,
  "tuple": tuple,
  "set": set,
  "frozenset": frozenset,
  "str": str,
  "unicode": str,
  "int": int,
  "long": int,
  "float": float,
  "complex": complex,
  "bool": bool,
  "object": object,
  "bytes": _bytes,
}
_VALUE_GLOBALS = {
  ("collections", "defaultdict"): _plain_dict,
  ("_codecs", "encode"): _latin1_bytes,
  ("numpy", "dtype"): _numpy_dtype,
  ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1.x
  ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2.x
  **{(m, k): v for m in ("builtins", "__builtin__") for k, v in _BUILTIN_TYPES.items()},
}
# Modules whose other globals are refused rather than kept as placeholders. Placeholders
# cannot run anything, so this is not what keeps code from running: it names an attack
# (or a tensor type we cannot read) in the error instead of failing later.
_REFUSED_MODULES = (
  "torch",
  "__torch__",
  "numpy",
  "builtins",
  "__builtin__",
  "os",
  "posix",
  "nt",
  "sys",
  "subprocess",
  "_posixsubprocess",
  "shutil",
  "pty",
  "socket",
  "webbrowser",
  "importlib",
  "runpy",
  "pickle",
  "_pickle",
  "copyreg",
  "marshal",
  "ctypes",
  "code",
  "codeop",
  "codecs",
  "_codecs",
  "operator",
  "functools",
  "types",
  "io",
  "_io",
  "tempfile",
  "multiprocessing",
  "signal",
  "pdb",
  "inspect",
  "gc",
  "threading",
  "_thread",
  "asyncio",
  "collections",
)


_SAFE_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch", "Size"): tuple,
  ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
  ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
  ("torch.storage", "TypedStorage"): _StorageType("TypedStorage", np.uint8),
  **{("torch", k): _StorageType(k, v) for k, v in _STORAGE_DTYPES.items()},
  **{("torch", k): np.dtype(v) for k, v in _TORCH_DTYPES.items()},
}
# Pure list/tag helpers the TorchScript pickler may emit for typed containers.
_TORCHSCRIPT_GLOBALS = {
  ("torch.jit._pickle", n): _identity
  for n in (
    "build_intlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
    "build_strlist",
    "restore_type_tag",
  )
}


# --- restricted unpickler ---------------------------------------------------


class Unpickler(pickle._Unpickler):
  # The pure-Python unpickler lets us also police BUILD (below); its speed is fine
  # because data.pkl holds only structure, never tensor bytes.
  dispatch = dict(pickle._Unpickler.dispatch)

  def __init__(self, data: bytes, read_storage, torchscript: bool, path: str):
    super().__init__(io.BytesIO(data))
    self._read_storage, self._torchscript, self._path = read_storage, torchscript, path
    self._classes: dict[str, type] = {}

  def find_class(self, module, name):
    key = (module, name)
    if key in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[key]
    if key in _VALUE_GLOBALS:
      return _VALUE_GLOBALS[key]
    qual = f"{module}.{name}"
    if self._torchscript:
      if key in _TORCHSCRIPT_GLOBALS:
        return _TORCHSCRIPT_GLOBALS[key]
      if module == "__torch__" or module.startswith("__torch__."):
        return self._placeholder(qual, TorchScriptObject)
    if module.split(".")[0] in _REFUSED_MODULES:
      raise UnsafeCheckpointError(
        f"refusing to load global '{qual}' from the checkpoint pickle (only torch "
        "tensor/storage rebuild helpers, dtypes, plain values and placeholders for "
        "other libraries' classes are allowed; this file may be malicious or use an "
        "unsupported tensor type)"
      )
    return self._placeholder(qual, Placeholder)

  def _placeholder(self, qual: str, base: type) -> type:
    if qual not in self._classes:
      self._classes[qual] = _placeholder_class(qual, base)
    return self._classes[qual]

  def persistent_load(self, pid):
    # torch writes ('storage', storage_type, key, location, numel) for every storage.
    if not (
      isinstance(pid, tuple)
      and len(pid) == 5
      and pid[0] == "storage"
      and isinstance(pid[1], _StorageType)
    ):
      raise ValueError(f"{self._path}: unsupported persistent id {pid!r}")
    _, stype, key, _location, numel = pid
    return self._read_storage(str(key), stype.dtype, int(numel))

  def _load_build(self):
    # BUILD calls __setstate__ / updates __dict__: allow it only on our
    # placeholders and on OrderedDict (torch attaches `_metadata` that way).
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, Placeholder):
      inst.__setstate__(state)
    elif type(inst) is collections.OrderedDict and isinstance(state, dict):
      inst.__dict__.update({str(k): v for k, v in state.items()})
    else:
      raise UnsafeCheckpointError(f"refusing to set state on a {type(inst).__name__} object")

  dispatch[pickle.BUILD[0]] = _load_build
