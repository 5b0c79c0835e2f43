"""Attention kernels: cuDNN's fused attention where it applies (bf16 on NVIDIA GPUs), XLA elsewhere.

On CPU: the XLA path against plain numpy attention, the selection rule, and the fallback when
cuDNN is unavailable. On a GPU (run with JAX_PLATFORMS=cuda, e.g. bench/gpu.sh): cuDNN against
XLA at ViT-B/16 and text-tower shapes, forward and gradients, and the whole TCL loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcl_jax.models import clip as clip_lib

on_gpu = pytest.mark.skipif(
  jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)"
)


def _qkv(shape, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in ks]


def _numpy_attention(q, k, v, causal):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    l = q.shape[1]
    logits = np.where(np.tril(np.ones((l, l), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_attention_is_softmax_attention(causal):
  q, k, v = _qkv((2, 37, 3, 16), jnp.float32)
  with jax.default_matmul_precision("highest"):  # GPUs default to TF32 for float32 dots
    y = clip_lib.attention(q, k, v, causal=causal, implementation="xla")
  np.testing.assert_allclose(np.asarray(y), _numpy_attention(q, k, v, causal), atol=2e-6)
  # bf16 inputs: logits and softmax stay float32 inside, so only input/output rounding remains.
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  yb = clip_lib.attention(qb, kb, vb, causal=causal, implementation="xla")
  assert yb.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(yb, np.float32), _numpy_attention(qb, kb, vb, causal), atol=2e-2
  )


def test_selection_uses_cudnn_only_for_16_bit_on_gpu():
  expected = "cudnn" if jax.default_backend() == "gpu" else "xla"
  assert clip_lib.attention_implementation(jnp.bfloat16) == expected
  assert clip_lib.attention_implementation(jnp.float16) == expected
  assert clip_lib.attention_implementation(jnp.float32) == "xla"
  with clip_lib.force_attention("cudnn"):
    assert clip_lib.attention_implementation(jnp.float32) == "cudnn"
  assert clip_lib.attention_implementation(jnp.float32) == "xla"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN is present on this GPU")
def test_cudnn_request_without_cudnn_falls_back_to_xla():
  q, k, v = _qkv((2, 37, 3, 16), jnp.bfloat16)
  f = jax.jit(lambda q, k, v: clip_lib.attention(q, k, v, causal=True, implementation="cudnn"))
  want = clip_lib.attention(q, k, v, causal=True, implementation="xla")
  np.testing.assert_array_equal(np.asarray(f(q, k, v), np.float32), np.asarray(want, np.float32))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@on_gpu
@pytest.mark.parametrize(
  "shape,causal",
  [
    ((8, 256, 12, 64), False),  # even lengths: cuDNN
    ((8, 64, 8, 64), True),
  ],
)  # trains on these
def test_cudnn_matches_xla_on_gpu(shape, causal):
  q, k, v = _qkv(shape, jnp.bfloat16, seed=1)
  ct = _qkv(shape, jnp.bfloat16, seed=2)[0]

  def run(impl):
    f = lambda q, k, v: jnp.sum(
      clip_lib.attention(q, k, v, causal=causal, implementation=impl).astype(jnp.float32) * ct
    )
    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    hlo = fn.lower(q, k, v).compile().as_text()
    return fn(q, k, v), hlo

  (y_c, g_c), hlo_c = run("cudnn")
  (y_x, g_x), hlo_x = run("xla")
  assert "fmha" in hlo_c.lower() and "fmha" not in hlo_x.lower()  # cuDNN fused attention ran
  assert _rel(y_c, y_x) < 1e-2
  for a, b in zip(g_c, g_x):
    assert _rel(a, b) < 2e-2


@on_gpu
@pytest.mark.parametrize(
  "shape,causal",
  [
    ((8, 197, 12, 64), False),  # ViT-B/16 image tower
    ((8, 77, 8, 64), True),
  ],
)  # text tower
def test_model_shapes_train_under_remat_on_gpu(shape, causal):
  """The automatic choice at the model's own (odd) lengths, differentiated through jax.checkpoint
  as `remat` does: cuDNN where it trains on them, else the XLA fallback, never a trace error
  (jax 0.11 + cuDNN 9 refused length 197 only when the remat step was differentiated)."""
  q, k, v = _qkv(shape, jnp.bfloat16, seed=3)
  f = lambda q, k, v: jnp.sum(
    jnp.square(clip_lib.attention(q, k, v, causal=causal).astype(jnp.float32))
  )
  g_auto = jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1, 2)))(q, k, v)
  with clip_lib.force_attention("xla"):
    g_xla = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_auto, g_xla):
    assert _rel(a, b) < 2e-2


@on_gpu
def test_tcl_loss_and_grads_same_with_cudnn_and_xla_on_gpu():
  from tcl_jax.models import tcl as tcl_lib

  cfg = tcl_lib.tiny_config()
  params = tcl_lib.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((4, 96, 96, 3)), jnp.float32)
  tokens = np.zeros((4, 77), np.int32)
  tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, rng.integers(300, 40000, (4, 5)), 49407

  def loss_and_grads():
    f = lambda tr: tcl_lib.tcl_loss(
      dict(tr, clip=params["clip"]),
      cfg,
      images,
      jnp.asarray(tokens),
      rng=jax.random.key(1),
      compute_dtype=jnp.bfloat16,
    )[0]
    tr = {k: v for k, v in params.items() if k != "clip"}
    return jax.jit(jax.value_and_grad(f))(tr)

  loss_c, g_c = loss_and_grads()
  with clip_lib.force_attention("xla"):
    loss_x, g_x = loss_and_grads()
  assert abs(float(loss_c) - float(loss_x)) <= 2e-2 * abs(float(loss_x))
  for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_x)):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if np.linalg.norm(b) > 0 and a.size > 1:
      assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.99


# ------------------------------------------------------------------------------------------------
# TPU pod launcher and pod-slice meshes (8 fake CPU devices from conftest.py)
# ------------------------------------------------------------------------------------------------


def _launch(*args):
  import os
  import subprocess

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [os.path.join(repo, "launch", "tpu_pod.sh"), *args],
    capture_output=True,
    text=True,
    cwd=repo,
    timeout=60,
  )


@pytest.mark.parametrize("tpu,accel", [("v4-32", "v4-32"), ("v5e-16", "v5litepod-16")])
def test_tpu_pod_dry_run_prints_the_commands(tpu, accel):
  import shlex

  r = _launch(
    "--dry-run",
    "--create",
    tpu,
    "my-tpu",
    "us-central2-b",
    "gs://b/run",
    "--config.mesh.shape=(2,4)",
    "--config.total_steps=10",
  )
  assert r.returncode == 0, r.stderr
  lines = [shlex.split(l) for l in r.stdout.splitlines()]
  assert [l[:4] for l in lines] == [["gcloud", "compute", "tpus", "tpu-vm"]] + [
    ["git", "archive", "--format=tar.gz", "-o"]
  ] + [["gcloud", "compute", "tpus", "tpu-vm"]] * 3
  assert lines[0][4:6] == ["create", "my-tpu"] and f"--accelerator-type={accel}" in lines[0]
  assert all("--worker=all" in l for l in lines[2:])
  assert "pip install -q -e '.[tpu]'" in lines[3][-1]
  # The training command every worker runs, as its shell will split it.
  remote = shlex.split(lines[4][-1].removeprefix("--command="))
  i = remote.index("tcl_jax.main")
  assert remote[i + 1 :] == [
    "--config=configs/tcl.py",
    "--workdir=gs://b/run",
    "--config.distributed.initialize=True",
    "--config.mesh.shape=(2,4)",
    "--config.total_steps=10",
  ]
  # Those flags, parsed as tcl_jax.main parses them, give a 2-way data x 4-way FSDP mesh.
  import json
  import subprocess
  import sys

  import ml_collections

  parse = (
    "import json, sys; from tcl_jax import main; from tcl_jax.cli import config_files; "
    "config_files.parse_flags(sys.argv); "
    "print(json.dumps(main.FLAGS.config.mesh.to_dict()))"
  )
  p = subprocess.run(
    [sys.executable, "-c", parse, *remote[i + 1 :]], capture_output=True, text=True, timeout=120
  )
  assert p.returncode == 0, p.stderr[-2000:]
  mesh_config = ml_collections.ConfigDict(json.loads(p.stdout.strip().splitlines()[-1]))
  _check_pod_mesh(ml_collections.ConfigDict({"mesh": mesh_config}), data=2, fsdp=4)


def _check_pod_mesh(config, data, fsdp):
  from tcl_jax import sharding
  from tcl_jax.models import tcl as tcl_lib

  mesh = sharding.make_mesh(config.mesh)
  assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {"data": data, "fsdp": fsdp}
  params = jax.eval_shape(
    lambda k: tcl_lib.init_params(tcl_lib.tiny_config(), k), jax.random.key(0)
  )
  specs = sharding.state_shardings(mesh, params, config.mesh)
  emb = specs["clip"]["text"]["token_embedding"]["embedding"].spec  # [49408, 64]
  assert emb == (
    jax.sharding.PartitionSpec("fsdp", None) if fsdp > 1 else jax.sharding.PartitionSpec()
  )
  assert specs["tcli_logit_scale"].spec == jax.sharding.PartitionSpec()
  assert sharding.data_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_default_pod_mesh_is_data_parallel_and_reshapes_by_config():
  from conftest import load_config_module

  config = load_config_module("tcl").get_config()
  _check_pod_mesh(config, data=8, fsdp=1)  # every leaf replicated
  config.mesh.shape = (2, 4)
  _check_pod_mesh(config, data=2, fsdp=4)
  config.mesh.shape = (-1, 2)
  _check_pod_mesh(config, data=4, fsdp=2)


def test_tpu_pod_usage_errors():
  r = _launch("--dry-run", "--create", "v9-8", "t", "z", "gs://b/run")
  (line,) = r.stderr.strip().splitlines()
  assert r.returncode == 2 and line.endswith(
    "tpu_pod.sh: unknown TPU type v9-8 (v4-N, v5e-N, v5p-N, v6e-N)"
  )
  r = _launch("--dry-run", "only-one-arg")
  assert r.returncode == 2 and "usage:" in r.stderr
