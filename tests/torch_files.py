"""Test helper: write ``torch.save`` files without torch.

torch.save writes a zip archive: ``archive/data.pkl`` is the object pickled with protocol 2,
each tensor reduced to ``torch._utils._rebuild_tensor_v2(storage, offset, torch.Size(shape),
stride, requires_grad, OrderedDict())`` and each storage written as a persistent id
``("storage", torch.<Type>Storage, key, "cpu", numel)`` whose bytes are ``archive/data/<key>``.
This writer does the same with the real pickle machinery; numpy arrays stand in for tensors and
everything else (dicts, numpy scalars, OmegaConf objects, ...) is pickled as pickle pickles it.
"""

import collections
import io
import pickle
import zipfile

import numpy as np

_STORAGE = {
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.float64): "DoubleStorage",
  np.dtype(np.float16): "HalfStorage",
  np.dtype(np.int64): "LongStorage",
  np.dtype(np.int32): "IntStorage",
  np.dtype(np.uint8): "ByteStorage",
  np.dtype(np.bool_): "BoolStorage",
}


class _TorchGlobal:
  """A torch global, written as a GLOBAL opcode (pickle cannot import torch to check it)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle wants a reduce function to be callable
    raise NotImplementedError


class _Size:
  def __init__(self, shape):
    self.shape = tuple(int(n) for n in shape)

  def __reduce__(self):
    return _TorchGlobal("torch", "Size"), (self.shape,)


class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, array


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages = []

  def _save_torch_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_TorchGlobal] = _save_torch_global

  def reducer_override(self, obj):
    if type(obj) is not np.ndarray:
      return NotImplemented
    a = np.array(obj, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    storage = _Storage(str(len(self.storages)), a)
    self.storages.append(storage)
    stride = tuple(s // a.itemsize for s in a.strides) if a.size else (1,) * a.ndim
    return (
      _TorchGlobal("torch._utils", "_rebuild_tensor_v2"),
      (storage, 0, _Size(a.shape), stride, False, collections.OrderedDict()),
    )

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return (
        "storage",
        _TorchGlobal("torch", _STORAGE[obj.array.dtype]),
        obj.key,
        "cpu",
        obj.array.size,
      )
    return None


def state_dict(arrays: dict) -> collections.OrderedDict:
  """An OrderedDict with the `_metadata` attribute nn.Module.state_dict() attaches."""
  sd = collections.OrderedDict(arrays)
  sd._metadata = collections.OrderedDict({"": {"version": 1}})
  return sd


def save(obj, path):
  """torch.save(obj, path), numpy arrays taking the place of tensors."""
  buf = io.BytesIO()
  p = _Pickler(buf)
  p.dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    z.writestr("archive/byteorder", "little")
    for s in p.storages:
      z.writestr(f"archive/data/{s.key}", s.array.tobytes())
    z.writestr("archive/version", "3\n")
  return path
