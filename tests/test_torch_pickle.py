"""Tests for tcl_jax.weights.torch_pickle, the torch-free restricted checkpoint reader."""

from __future__ import annotations

from pathlib import Path
import pickle
import pickletools
import struct
import zipfile

import ml_dtypes
import numpy as np
import omegaconf
import pytest
import torch_files

from tcl_jax.weights.torch_pickle import Placeholder
from tcl_jax.weights.torch_pickle import TorchScriptObject
from tcl_jax.weights.torch_pickle import UnsafeCheckpointError
from tcl_jax.weights.torch_pickle import load_pickle
from tcl_jax.weights.torch_pickle import load_state_dict

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIX = SHARED / "fixtures" / "tcl_tiny"


def _fixture(name: str) -> Path:
  if not (FIX / name).exists():
    pytest.skip("../shared fixtures not present (clone without the shared fixtures)")
  return FIX / name


# --- a tiny hand-written pickle assembler (protocol 2 opcodes) ---------------
# torch is not installed, so checkpoints are built opcode by opcode; this is also
# the only way to reference globals such as `os.system` without touching them.


def g(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def s(text: str) -> bytes:
  raw = text.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def i(n: int) -> bytes:
  return pickle.BININT + struct.pack("<i", n)


def tup(*items: bytes) -> bytes:
  return pickle.MARK + b"".join(items) + pickle.TUPLE


def tensor(storage_cls: str, key: str, numel: int, offset: int, size, stride) -> bytes:
  """_rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())."""
  pid = tup(s("storage"), g("torch", storage_cls), s(key), s("cpu"), i(numel)) + pickle.BINPERSID
  args = tup(
    pid,
    i(offset),
    tup(*map(i, size)),
    tup(*map(i, stride)),
    pickle.NEWFALSE,
    g("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE,
  )
  return g("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def state_dict_pickle(entries: dict[str, bytes]) -> bytes:
  body = b"".join(s(k) + v for k, v in entries.items())
  return (
    pickle.PROTO
    + b"\x02"
    + g("collections", "OrderedDict")
    + pickle.EMPTY_TUPLE
    + pickle.REDUCE
    + pickle.MARK
    + body
    + pickle.SETITEMS
    + pickle.STOP
  )


def write_ckpt(
  path: Path,
  pkl: bytes,
  storages: dict[str, bytes] = (),
  prefix="archive",
  byteorder="little",
  extra: dict[str, bytes] = (),
) -> Path:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{prefix}/data.pkl", pkl)
    z.writestr(f"{prefix}/byteorder", byteorder)
    z.writestr(f"{prefix}/version", "3\n")  # torch.load needs it; we don't
    for k, raw in dict(storages).items():
      z.writestr(f"{prefix}/data/{k}", raw)
    for name, raw in dict(extra).items():
      z.writestr(f"{prefix}/{name}", raw)
  return path


# --- (a) plain vs TorchScript archives ----------------------------------------


def test_plain_and_torchscript_archives_agree():
  plain = load_state_dict(_fixture("clip_openai.pt"))
  jit = load_state_dict(_fixture("clip_openai_jit.pt"))
  assert len(plain) == 86
  assert list(plain) == list(jit)  # same names in the same (state_dict) order
  for k in plain:
    assert plain[k].dtype == jit[k].dtype == np.float32, k
    np.testing.assert_array_equal(plain[k], jit[k], err_msg=k)
  # OpenAI CLIP naming and the tiny fixture's dims (vision 128 wide, text 64, embed 64)
  assert list(jit)[:4] == [
    "positional_embedding",
    "text_projection",
    "logit_scale",
    "visual.class_embedding",
  ]
  assert jit["visual.conv1.weight"].shape == (128, 3, 16, 16)
  assert jit["transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
  assert jit["visual.transformer.resblocks.3.mlp.c_proj.weight"].shape == (128, 512)
  assert jit["logit_scale"].shape == ()
  assert jit["positional_embedding"].shape == (77, 64)
  assert jit["token_embedding.weight"].shape == (49408, 64)
  # training flags / hook markers / submodule objects never leak in
  assert all(isinstance(v, np.ndarray) for v in jit.values())
  assert not any(k.endswith(("training", "_is_full_backward_hook")) for k in jit)
  # arrays are owned, writable, contiguous copies
  assert all(v.flags.c_contiguous and v.flags.writeable for v in jit.values())


def test_torchscript_raw_tree_is_inert_placeholders():
  root = load_pickle(_fixture("clip_openai_jit.pt"))
  assert isinstance(root, TorchScriptObject)
  assert root.type_name == "__torch__.sclip.model.CLIP"
  assert root.state["training"] is False
  conv = root.state["visual"].state["conv1"]
  assert conv.type_name == "__torch__.torch.nn.modules.conv.Conv2d"
  assert conv.state["weight"].shape == (128, 3, 16, 16)


# --- (b) {"model": state_dict} ------------------------------------------------


def test_tcl_reference_model_dict():
  raw = load_pickle(_fixture("tcl_reference.pth"))
  assert list(raw) == ["model"]
  sd = load_state_dict(_fixture("tcl_reference.pth"))
  assert len(sd) == 127
  assert list(sd) == list(raw["model"])
  assert sd["masker.sim2mask.w"].shape == () and sd["masker.sim2mask.b"].shape == ()
  assert sd["tcli_loss.logit_scale"].shape == () and sd["tclf_loss.logit_scale"].shape == ()
  assert sd["pamr.aff_x.kernel"].shape == (8, 1, 3, 3)
  assert sd["pamr.aff_m.kernel"].shape == (8, 1, 3, 3)
  assert sd["pamr.aff_std.kernel"].shape == (9, 1, 3, 3)
  assert sd["masker.image_encoder.decoder.decoder.net.0.conv.conv.weight"].shape == (128, 128, 3, 3)
  assert sd["masker.image_encoder.decoder.image_proj.proj"].shape == (128, 64)
  # the CLIP copies inside TCL hold the same weights as the OpenAI-layout file
  clip = load_state_dict(_fixture("clip_openai.pt"))
  n = 0
  for k, v in sd.items():
    for pre, clip_pre in (
      ("clip_text_encoder.", ""),
      ("clip_image_encoder.clip_visual.", "visual."),
    ):
      if k.startswith(pre):
        np.testing.assert_array_equal(v, clip[clip_pre + k[len(pre) :]], err_msg=k)
        n += 1
  assert n == 29 + 53


# --- (c) malicious pickles ----------------------------------------------------


@pytest.mark.parametrize(
  "module,name",
  [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("__builtin__", "exec")],
)
def test_malicious_global_is_refused(tmp_path, module, name):
  marker = tmp_path / "pwned"
  arg = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"
  pkl = pickle.PROTO + b"\x02" + g(module, name) + tup(s(arg)) + pickle.REDUCE + pickle.STOP
  ops = [(op.name, a) for op, a, _ in pickletools.genops(pkl)]
  assert ("GLOBAL", f"{module} {name}") in ops and ("REDUCE", None) in ops  # payload is real
  ckpt = write_ckpt(tmp_path / "evil.pt", pkl)
  with pytest.raises(UnsafeCheckpointError, match=rf"'{module}\.{name}'"):
    load_state_dict(ckpt)
  with pytest.raises(ValueError):  # it is also a ValueError
    load_pickle(ckpt)
  assert not marker.exists()


def test_malicious_global_inside_a_tensor_and_torchscript_archive(tmp_path):
  marker = tmp_path / "pwned"
  evil = g("os", "system") + tup(s(f"touch {marker}")) + pickle.REDUCE
  pkl = state_dict_pickle({"w": tensor("FloatStorage", "0", 1, 0, (1,), (1,)), "x": evil})
  for extra in ({}, {"constants.pkl": b"", "code/__torch__.py": b""}):  # plain / TorchScript
    ckpt = write_ckpt(tmp_path / "evil.pt", pkl, {"0": b"\0" * 4}, extra=extra)
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
      load_state_dict(ckpt)
  assert not marker.exists()


def test_torchscript_classes_only_in_torchscript_archives(tmp_path):
  pkl = (
    pickle.PROTO
    + b"\x02"
    + g("__torch__.evil", "Mod")
    + pickle.EMPTY_TUPLE
    + pickle.NEWOBJ
    + pickle.EMPTY_DICT
    + pickle.BUILD
    + pickle.STOP
  )
  with pytest.raises(UnsafeCheckpointError, match=r"__torch__\.evil\.Mod"):
    load_pickle(write_ckpt(tmp_path / "a.pt", pkl))
  obj = load_pickle(write_ckpt(tmp_path / "b.pt", pkl, extra={"constants.pkl": b""}))
  assert isinstance(obj, TorchScriptObject) and obj.state == {}


def test_build_on_tensor_is_refused(tmp_path):
  # BUILD would call ndarray.__setstate__; only placeholders/OrderedDict may get state
  pkl = (
    pickle.PROTO
    + b"\x02"
    + tensor("FloatStorage", "0", 1, 0, (1,), (1,))
    + pickle.EMPTY_DICT
    + pickle.BUILD
    + pickle.STOP
  )
  with pytest.raises(UnsafeCheckpointError, match="set state"):
    load_pickle(write_ckpt(tmp_path / "a.pt", pkl, {"0": b"\0" * 4}))


def test_eval_is_refused_even_where_nothing_calls_it(tmp_path):
  # Refused when named, not only when called (the REDUCE test above would also stop it).
  pkl = (
    pickle.PROTO
    + b"\x02"
    + pickle.EMPTY_DICT
    + s("config")
    + g("builtins", "eval")
    + pickle.SETITEM
    + pickle.STOP
  )
  with pytest.raises(UnsafeCheckpointError, match=r"'builtins\.eval'"):
    load_pickle(write_ckpt(tmp_path / "a.pt", pkl))


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    import os  # pylint: disable=import-outside-toplevel

    return os.system, (f"touch {self.marker}",)


def test_real_reduce_payload_in_a_training_checkpoint_is_refused(tmp_path):
  # pickled by the real pickler, as torch.save would, beside a valid model state_dict
  marker = tmp_path / "pwned"
  ckpt = torch_files.save(
    {
      "model": torch_files.state_dict({"w": np.ones(2, np.float32)}),
      "config": _Payload(marker),
      "step": 3,
    },
    tmp_path / "checkpoint.pth",
  )
  assert b"system" in zipfile.ZipFile(ckpt).read("archive/data.pkl")  # payload is real
  with pytest.raises(UnsafeCheckpointError, match=r"'(posix|os|nt)\.system'"):
    load_state_dict(ckpt)
  assert not marker.exists()


@pytest.mark.parametrize("opcodes", ["reduce", "inst", "obj"])
def test_placeholder_classes_cannot_be_called(tmp_path, opcodes):
  # A class of another library becomes a placeholder; every opcode that calls it is refused.
  args = tup(s("arg"))
  pkl = {
    "reduce": g("mylib.config", "Config") + args + pickle.REDUCE,
    "inst": pickle.MARK + s("arg") + pickle.INST + b"mylib.config\nConfig\n",
    "obj": pickle.MARK + g("mylib.config", "Config") + s("arg") + pickle.OBJ,
  }[opcodes]
  with pytest.raises(UnsafeCheckpointError, match=r"refusing to call 'mylib\.config\.Config'"):
    load_pickle(write_ckpt(tmp_path / "a.pt", pickle.PROTO + b"\x02" + pkl + pickle.STOP))


def test_placeholder_instances_hold_what_pickle_hands_them(tmp_path):
  pkl = (
    pickle.PROTO
    + b"\x02"
    + g("mylib.config", "Config")
    + tup(s("a"))
    + pickle.NEWOBJ
    + pickle.EMPTY_DICT
    + s("lr")
    + i(3)
    + pickle.SETITEM
    + pickle.BUILD
    + pickle.STOP
  )
  obj = load_pickle(write_ckpt(tmp_path / "a.pt", pkl))
  assert isinstance(obj, Placeholder) and not isinstance(obj, TorchScriptObject)
  assert (obj.type_name, obj.args, obj.state) == ("mylib.config.Config", ("a",), {"lr": 3})


def _training_checkpoint(tmp_path):
  """The layout of the original's utils/checkpoint.py save_checkpoint (written by its main.py)."""
  config = omegaconf.OmegaConf.create(
    {
      "model": {"type": "TCL", "clip_model": "ViT-B/16", "ie_freeze": 11, "tcl_w": 0.1},
      "train": {"total_steps": 50000, "base_lr": 1.6e-3, "lr": "${train.base_lr}"},
      "evaluate": {"task": ["voc", "context"]},
      "output": "output/tcl",
      "seed": None,
    }
  )
  omegaconf.OmegaConf.set_struct(config, True)
  model = torch_files.state_dict(
    {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(2.5, np.float32)}
  )
  return (
    torch_files.save(
      {
        "model": model,
        "optimizer": {
          "state": {
            0: {"step": np.array(5.0, np.float32), "exp_avg": np.full((2, 3), 0.5, np.float32)}
          },
          "param_groups": [
            {"lr": 1e-4, "betas": (0.9, 0.999), "amsgrad": False, "foreach": None, "params": [0]}
          ],
        },
        "lr_scheduler": {"_milestones": [15000], "last_epoch": 5, "_last_lr": [1e-4]},
        "scaler": {"scale": 65536.0, "_growth_tracker": 3},
        "step": 5,
        "config": config,
        "metrics": {"val/voc_miou": 40.5, "val/avg_miou": np.mean([40.5, 30.25])},
      },
      tmp_path / "checkpoint.pth",
    ),
    config,
    model,
  )


def test_training_checkpoint_other_entries_are_inert(tmp_path, monkeypatch):
  ckpt, config, model = _training_checkpoint(tmp_path)
  pkl = zipfile.ZipFile(ckpt).read("archive/data.pkl")
  ops = {(op.name, a) for op, a, _ in pickletools.genops(pkl)}
  assert ("GLOBAL", "omegaconf.dictconfig DictConfig") in ops  # the real OmegaConf pickle

  def never(*_):
    raise AssertionError("omegaconf code ran while reading the checkpoint")

  monkeypatch.setattr(omegaconf.base.Node, "__setstate__", never)
  monkeypatch.setattr(omegaconf.base.Metadata, "__init__", never)
  raw = load_pickle(ckpt)
  cfg = raw["config"]
  assert isinstance(cfg, Placeholder) and cfg.type_name == "omegaconf.dictconfig.DictConfig"
  assert list(cfg.state["_content"]) == list(config)
  node = cfg.state["_content"]["train"].state["_content"]["lr"]
  assert node.type_name == "omegaconf.nodes.AnyNode" and node.state["_val"] == "${train.base_lr}"
  assert cfg.state["_metadata"].state["flags"] == {"struct": True}
  with pytest.raises(UnsafeCheckpointError, match="refusing to call"):
    type(cfg)()
  m = raw["metrics"]["val/avg_miou"]
  assert type(m) is np.float64 and m == 35.375  # numpy scalars are values, not placeholders
  assert raw["optimizer"]["state"][0]["exp_avg"].tolist() == [[0.5] * 3] * 2
  assert raw["step"] == 5 and raw["scaler"]["scale"] == 65536.0
  sd = load_state_dict(ckpt)  # the "model" entry only
  assert list(sd) == ["w", "s"]
  np.testing.assert_array_equal(sd["w"], model["w"])
  assert sd["s"].shape == () and sd["s"] == 2.5


# --- (d) strided / offset / dtype rebuild --------------------------------------


def test_strided_offset_and_dtypes(tmp_path):
  base = np.arange(60, dtype=np.float32)  # a 6x10 matrix's storage
  half = np.linspace(-2, 2, 12).astype(np.float16)
  bf = np.array([1.5, -3.0, 0.15625, 1e30], dtype=ml_dtypes.bfloat16)
  pkl = state_dict_pickle(
    {
      # x[1:, 2:].T of the 6x10 matrix: offset 12, sizes (8, 5), strides (1, 10)
      "transposed": tensor("FloatStorage", "0", 60, 12, (8, 5), (1, 10)),
      "row": tensor("FloatStorage", "0", 60, 30, (10,), (1,)),  # shares storage 0
      "broadcast": tensor("FloatStorage", "0", 60, 7, (3, 4), (0, 1)),  # expand()
      "scalar": tensor("FloatStorage", "0", 60, 59, (), ()),
      "empty": tensor("FloatStorage", "0", 60, 0, (0, 4), (4, 1)),
      "half": tensor("HalfStorage", "1", 12, 0, (3, 4), (4, 1)),
      "bf16": tensor("BFloat16Storage", "2", 4, 0, (2, 2), (1, 2)),  # column-major
      "long": tensor("LongStorage", "3", 3, 1, (2,), (1,)),
      "bool": tensor("BoolStorage", "4", 3, 0, (3,), (1,)),
    }
  )
  storages = {
    "0": base.tobytes(),
    "1": half.tobytes(),
    "2": bf.tobytes(),
    "3": np.array([-1, 2, 2**40], np.int64).tobytes(),
    "4": np.array([1, 0, 1], np.uint8).tobytes(),
  }
  sd = load_state_dict(write_ckpt(tmp_path / "v.pt", pkl, storages, prefix="some_name"))
  m = base.reshape(6, 10)
  assert list(sd) == [
    "transposed",
    "row",
    "broadcast",
    "scalar",
    "empty",
    "half",
    "bf16",
    "long",
    "bool",
  ]
  np.testing.assert_array_equal(sd["transposed"], m[1:, 2:].T)
  assert sd["transposed"].flags.c_contiguous and sd["transposed"].dtype == np.float32
  np.testing.assert_array_equal(sd["row"], m[3])
  np.testing.assert_array_equal(sd["broadcast"], np.broadcast_to(base[7:11], (3, 4)))
  assert sd["scalar"].shape == () and sd["scalar"] == 59.0
  assert sd["empty"].shape == (0, 4)
  assert sd["half"].dtype == np.float16
  np.testing.assert_array_equal(sd["half"], half.reshape(3, 4))
  assert sd["bf16"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(sd["bf16"], bf.reshape(2, 2).T)
  assert sd["long"].dtype == np.int64 and sd["long"].tolist() == [2, 2**40]
  assert sd["bool"].dtype == np.bool_ and sd["bool"].tolist() == [True, False, True]
  sd["transposed"][0, 0] = -1  # an owned copy: does not alias the shared storage
  assert sd["row"][0] == 30.0


def test_big_endian_archive(tmp_path):
  vals = np.array([1.25, -2.5, 3.0], np.float32)
  bf = np.array([1.5, -3.0], ml_dtypes.bfloat16)
  pkl = state_dict_pickle(
    {
      "a": tensor("FloatStorage", "0", 3, 0, (3,), (1,)),
      "b": tensor("BFloat16Storage", "1", 2, 0, (2,), (1,)),
    }
  )
  storages = {"0": vals.astype(">f4").tobytes(), "1": bf.view(np.uint16).astype(">u2").tobytes()}
  sd = load_state_dict(write_ckpt(tmp_path / "be.pt", pkl, storages, byteorder="big"))
  np.testing.assert_array_equal(sd["a"], vals)
  np.testing.assert_array_equal(sd["b"], bf)


def test_view_outside_storage_is_rejected(tmp_path):
  # as_strided does no bounds checks; a crafted view must not read past the storage
  pkl = state_dict_pickle({"w": tensor("FloatStorage", "0", 4, 2, (3,), (1,))})
  with pytest.raises(ValueError, match="exceeds its storage"):
    load_state_dict(write_ckpt(tmp_path / "oob.pt", pkl, {"0": b"\0" * 16}))


def test_nested_checkpoint_picks_model(tmp_path):
  t = tensor("FloatStorage", "0", 2, 0, (2,), (1,))
  pkl = (
    pickle.PROTO
    + b"\x02"
    + pickle.EMPTY_DICT
    + pickle.MARK
    + s("epoch")
    + i(3)
    + s("state_dict")
    + pickle.EMPTY_DICT
    + pickle.MARK
    + s("w")
    + t
    + pickle.SETITEMS
    + s("optimizer")
    + pickle.EMPTY_DICT
    + pickle.SETITEMS
    + pickle.STOP
  )
  path = write_ckpt(tmp_path / "n.pt", pkl, {"0": np.float32([4, 5]).tobytes()})
  assert load_pickle(path)["epoch"] == 3
  sd = load_state_dict(path)
  assert list(sd) == ["w"] and sd["w"].tolist() == [4.0, 5.0]


# --- (e) bad files ----------------------------------------------------------


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pt"):
    load_state_dict(tmp_path / "nope.pt")


def test_corrupt_and_truncated_files(tmp_path):
  data = _fixture("tcl_reference.pth").read_bytes()
  cases = {
    "truncated.pth": data[: len(data) // 2],
    "tail_cut.pth": data[:-30],
    "garbage.pth": b"this is not a checkpoint at all",
    "empty.pth": b"",
  }
  flipped = bytearray(data)  # a corrupted storage byte fails the member's CRC
  flipped[len(data) // 2] ^= 0xFF
  cases["bitflip.pth"] = bytes(flipped)
  for name, raw in cases.items():
    p = tmp_path / name
    p.write_bytes(raw)
    with pytest.raises(ValueError, match=name) as err:
      load_state_dict(p)
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_legacy_format_message(tmp_path):
  # pre-1.6 torch.save: a bare pickle stream starting with torch's magic number
  p = tmp_path / "legacy.pt"
  p.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps({}, protocol=2))
  with pytest.raises(ValueError, match="legacy.*not supported.*torch.save"):
    load_state_dict(p)


def test_zip_without_data_pkl(tmp_path):
  p = tmp_path / "other.zip"
  with zipfile.ZipFile(p, "w") as z:
    z.writestr("readme.txt", "hi")
  with pytest.raises(ValueError, match="no data.pkl"):
    load_state_dict(p)
