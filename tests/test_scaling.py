"""tcl_jax.tools.scaling: the collective bytes it reads off the compiled training step, against
counts derived by hand from the tiny config.

One CLI call compiles the tiny training step on 8 and on 32 fake CPU devices (a subprocess per
device count, as the tool runs them) at 4 images per device. By hand: the contrastive terms
all-gather the global batch's caption embeddings ([B, E] float32, one matrix per term that
compares images with every caption of the global batch: the similarity map, TCL_f, TCL_i), and
the one gradient all-reduce carries the trainable parameters (the masker and the two logit
scales; CLIP is frozen), beside a few [B]-sized loss reductions.
"""

import json
import os
import subprocess
import sys

import pytest

from tcl_jax.models import tcl as tcl_lib
from tcl_jax.perf import chips
from tcl_jax.tools import scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_CHIP = 4
DEVICES = (8, 32)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("scaling") / "scaling.json"
  cmd = [sys.executable, "-m", "tcl_jax.tools.scaling", "--devices", ",".join(map(str, DEVICES))]
  cmd += ["--preset", "tiny", "--batch", str(PER_CHIP), "--eval-windows", "0", "--json", str(out)]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return {res["devices"]: res["train"] for res in json.loads(out.read_text())["result"]["measured"]}


def _trainable_bytes_by_hand(cfg: tcl_lib.TCLConfig) -> int:
  """float32 bytes of what TCL trains: the masker's copy of the vision blocks after ie_freeze,
  its gated-conv decoder, its image projection, Sim2Mask's w and b, the two logit scales."""
  w, e, k = cfg.clip.vision_width, cfg.clip.embed_dim, cfg.decoder_kernel_size
  # in_proj w x 3w + 3w, out_proj w x w + w, c_fc w x 4w + 4w, c_proj 4w x w + w, 2 layer norms
  block = 12 * w * w + 13 * w
  conv = k * k * w * w + w + 1 + 2 * w  # kernel, bias, gate, layer norm
  decoder = cfg.decoder_n_layers * (2 if cfg.decoder_double else 1) * conv
  image_proj = 2 * w + w * e
  return 4 * ((cfg.clip.vision_layers - cfg.ie_freeze) * block + decoder + image_proj + 2 + 2)


@pytest.mark.parametrize("n", DEVICES)
def test_contrastive_all_gathers_are_the_global_batch_embeddings(report, n):
  cfg = tcl_lib.tiny_config()
  global_batch = PER_CHIP * n
  embedding_bytes = global_batch * cfg.clip.embed_dim * 4  # [B, E] float32
  gathers = [op for op in report[n]["ops"] if op["kind"] == "all-gather"]
  assert 1 <= len(gathers) <= 3, gathers  # similarity map, TCL_f, TCL_i (XLA may merge them)
  assert all(op["bytes"] == embedding_bytes and op["group"] == n for op in gathers), gathers
  assert report[n]["collectives"]["all-gather"]["bytes"] == len(gathers) * embedding_bytes


@pytest.mark.parametrize("n", DEVICES)
def test_gradient_all_reduce_is_the_trainable_parameters(report, n):
  cfg = tcl_lib.tiny_config()
  trainable = _trainable_bytes_by_hand(cfg)
  assert report[n]["trainable_param_bytes"] == trainable
  reduces = [op for op in report[n]["ops"] if op["kind"] == "all-reduce"]
  assert all(op["group"] == n for op in reduces)
  grads = max(reduces, key=lambda op: op["bytes"])
  # XLA combines a few loss reductions (scalars, [B] vectors) into the gradients' tuple.
  assert trainable <= grads["bytes"] <= trainable + 4 * PER_CHIP * n * 4 + 256
  # Everything else all-reduced is per-example loss statistics ([B] vectors, scalars): nothing
  # of the size of the global batch's masks [B, H', W'] or embeddings.
  overhead = report[n]["collectives"]["all-reduce"]["bytes"] - trainable
  assert 0 <= overhead <= 8 * PER_CHIP * n * 4 + 1024, reduces


def test_hlo_collectives_parsed_by_kind_bytes_and_group():
  hlo = "\n".join(
    [
      "  %ag = f32[32,64]{1,0} all-gather(%x), channel_id=1, "
      "replica_groups=mesh['data'=8,'fsdp'=4] {'data'}, dimensions={0}",
      "  %ar = (f32[], bf16[128,3]{1,0}) all-reduce(%a, %b), replica_groups=[4,8]<=[32]",
      "  %rs = f32[4,8]{1,0} reduce-scatter(%y), replica_groups={{0,1},{2,3}}",
      "  %aa = (s32[2,2]{1,0}, s32[2,2]{1,0}) all-to-all(%p, %q), replica_groups={}",
      "  %ags = (f32[4]{0}, f32[16]{0}) all-gather-start(%z), replica_groups=[1,4]<=[4]",
      "  %agd = f32[16]{0} all-gather-done(%ags)",
      "  %add = f32[32,64]{1,0} add(%ag, %ag)",
    ]
  )
  ops = scaling.collectives(hlo, 32)
  assert [(o["kind"], o["bytes"], o["group"]) for o in ops] == [
    ("all-gather", 32 * 64 * 4, 8),
    ("all-reduce", 4 + 128 * 3 * 2, 8),
    ("reduce-scatter", 4 * 8 * 4, 2),
    ("all-to-all", 2 * 4 * 4, 32),
    ("all-gather", 16 * 4, 4),
  ]


def test_comm_time_per_kind_and_cross_node_bandwidth():
  gpu = chips.Interconnect("test", 1e15, link_bytes_per_s=100.0, domain_size=8,
                           cross_node_bytes_per_s=10.0)  # fmt: skip
  ops = lambda kind, group: [{"kind": kind, "bytes": 800, "group": group}]
  assert scaling.comm_seconds(ops("all-reduce", 8), gpu) == pytest.approx(2 * 7 / 8 * 800 / 100)
  assert scaling.comm_seconds(ops("all-gather", 8), gpu) == pytest.approx(7 / 8 * 800 / 100)
  assert scaling.comm_seconds(ops("reduce-scatter", 4), gpu) == pytest.approx(3 * 800 / 100)
  assert scaling.comm_seconds(ops("all-reduce", 16), gpu) == pytest.approx(2 * 15 / 16 * 800 / 10)
  assert scaling.comm_seconds(ops("all-reduce", 1), gpu) == 0


def test_bad_devices_is_one_error_line():
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.tools.scaling", "--devices", "8,x"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 2
  assert r.stderr.strip().startswith("error: --devices") and len(r.stderr.strip().splitlines()) == 1


def test_help_says_what_the_tool_does_in_whole_sentences():
  # Was: "... collective bytes of the training" (the docstring's first line, cut mid-sentence).
  text = " ".join(scaling._parser().format_help().split())  # pylint: disable=protected-access
  assert (
    "A scaling report from compiled programs: per-chip memory, FLOPs and collective bytes of the "
    "training and evaluation steps, compiled for TPU slices by the TPU compiler or on N fake CPU "
    "devices, and the step time they predict on TPU/GPU pods."
  ) in text
  assert "--json JSON_OUT also write the report here" in text


def test_readme_scaling_table_is_the_committed_report():
  with open(os.path.join(REPO, "docs", "results", "scaling.json")) as f:
    table = scaling.readme_table(json.load(f)["result"])
  with open(os.path.join(REPO, "README.md")) as f:
    lines = f.read().splitlines()
  assert table[0] in lines, table[0]  # the header, then the rows as the report gives them
  start = lines.index(table[0])
  assert lines[start : start + len(table)] == table
  assert not lines[start + len(table)].startswith("|")


def test_scaling_rows_count_every_caption_chunk(monkeypatch):
  # XLA's cost analysis counts a loop's body once: a row must not lose the caption loop's other
  # iterations (it did before the rows lowered the step as one chunk for the count).
  from tcl_jax.perf import timing
  from tcl_jax.tools import scaling_worker

  cfg, res = timing.preset("tiny")
  flops = {}
  for chunk in (2, 64):  # 16 captions per step: 8 loop iterations, then one
    monkeypatch.setattr(timing, "preset", lambda name, c=chunk: (cfg.replace(caption_chunk=c), res))
    program = scaling_worker._Program({"preset": "tiny", "mesh": "data", "fsdp": 1})
    row = scaling_worker.compile_train(program, 2, None, None)
    flops[chunk] = row["model_flops_per_chip"]
  assert flops[2] == flops[64] and flops[2] > 0, flops
