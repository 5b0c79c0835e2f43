"""Training loop: optimizer semantics, 8-device == 1-device, exact resume, non-finite stop.

The SIGTERM test (a subprocess run of `python -m tcl_jax.main`) is in test_train_preemption.py.
All of it runs on 8 fake CPU devices (tests/conftest.py) with a very small TCL model.
"""

import functools
import math
import os
import signal

from conftest import load_config_module
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tcl_jax import kinds
from tcl_jax import sharding
from tcl_jax.kinds import base
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.train import checkpointing
from tcl_jax.train import loop as train
from tcl_jax.train import optim
from tcl_jax.train import step as step_lib
from tcl_jax.train import summaries

tcl_config = load_config_module("tcl")

pytestmark = pytest.mark.usefixtures("fast_compiles")


def small_clip():
  return dict(
    embed_dim=16,
    image_resolution=32,
    vision_layers=2,
    vision_width=32,
    vision_patch_size=16,
    vision_heads=2,
    context_length=77,
    vocab_size=1000,
    transformer_width=32,
    transformer_heads=2,
    transformer_layers=1,
  )


def small_config(**overrides) -> ml_collections.ConfigDict:
  """configs/tcl.py:smoke with an even smaller CLIP (32 px, 2 + 1 layers)."""
  c = tcl_config.get_config("smoke")
  c.batch_size = 8  # FakeIterator(8, ...)
  c.model.clip = small_clip()
  c.model.ie_freeze = 1
  c.input.image_size = 32
  c.optim.base_lr = 1e-2  # visible updates at batch 8 (scaled by 8/4096)
  c.optim.warmup_steps = 2
  c.optim.ust_steps = 2
  c.optim.clip_grad = 5.0
  c.checkpoint.async_save = False
  for k, v in overrides.items():
    c[k] = v
  return c


class FakeIterator:
  """Deterministic batches: batch i depends only on (seed, i); state = number served."""

  def __init__(self, batch_size, image_size, vocab=1000, seed=0):
    self.b, self.s, self.vocab, self.seed, self.i = batch_size, image_size, vocab, seed, 0

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.i])
    self.i += 1
    tokens = np.zeros((self.b, 77), np.int32)
    tokens[:, 0] = 1
    tokens[:, 1:6] = rng.integers(2, self.vocab - 1, (self.b, 5))
    tokens[:, 6] = self.vocab - 1  # EOT = largest id (CLIP pools at argmax)
    images = rng.normal(size=(self.b, self.s, self.s, 3)).astype(np.float32)
    return {"image": images, "text_tokens": tokens}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = int(state["i"])

  def counters(self):
    return {"bad_record": 0}


# ------------------------------------------------------------------------------------------------
# Schedule and optimizer
# ------------------------------------------------------------------------------------------------


def test_conftest_gives_eight_cpu_devices():
  assert jax.device_count() == 8
  assert jax.devices()[0].platform == "cpu"


def test_schedule_matches_torch_linear_then_cosine():
  peak, low = 1e-3, 1e-4
  lr = optim.warmup_cosine_schedule(peak, low, warmup_steps=10, total_steps=110)
  # LinearLR(start_factor=1e-4): starts at 1e-4 * peak, linear to peak at the milestone.
  np.testing.assert_allclose(float(lr(0)), 1e-7, rtol=1e-5)
  np.testing.assert_allclose(float(lr(5)), peak * (1e-4 + (1 - 1e-4) * 0.5), rtol=1e-5)
  np.testing.assert_allclose(float(lr(10)), peak, rtol=1e-6)
  # CosineAnnealingLR(T_max=100, eta_min=low): halfway is the mean, the end is eta_min.
  np.testing.assert_allclose(float(lr(60)), (peak + low) / 2, rtol=1e-5)
  np.testing.assert_allclose(
    float(lr(35)), low + (peak - low) * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-5
  )
  np.testing.assert_allclose(float(lr(110)), low, rtol=1e-5)
  np.testing.assert_allclose(float(lr(500)), low, rtol=1e-5)


def test_paper_lr_is_scaled_by_global_batch():
  c = tcl_config.get_config()
  peak, low = optim.scaled_lrs(c.optim, c.batch_size)
  assert c.batch_size == 1024
  np.testing.assert_allclose(peak, 3e-4 * 1024 / 4096)  # 7.5e-5
  np.testing.assert_allclose(low, 4e-5 * 1024 / 4096)  # 1e-5


def _toy_params():
  return {
    "clip": {"visual": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
    "masker": {
      "backbone": {"kernel": jnp.full((2, 2), 2.0), "ln": {"scale": jnp.ones((2,))}},
      "decoder": {"kernel": jnp.full((3, 2), 1.0), "bias": jnp.zeros((2,)), "gate": jnp.zeros(())},
      "sim2mask": {"w": jnp.asarray(10.0), "b": jnp.asarray(-2.5)},
    },
    "tcli_logit_scale": jnp.asarray(2.0),
  }


def test_labels_and_weight_decay_rule():
  params = _toy_params()
  c = tcl_config.get_config().optim
  labels = optim.param_labels(params, c.frozen_regex, c.ust_regex)
  assert labels["clip"]["visual"]["kernel"] == "frozen"
  assert labels["masker"]["backbone"]["kernel"] == "ust"
  assert labels["masker"]["backbone"]["ln"]["scale"] == "ust"
  assert labels["masker"]["decoder"]["kernel"] == "trainable"
  assert labels["tcli_logit_scale"] == "trainable"
  decay = optim.decay_mask(params)
  # The original: no decay for 1-D tensors and names ending in "bias"; 0-d scalars ARE decayed.
  assert decay["masker"]["decoder"]["kernel"] and decay["masker"]["backbone"]["kernel"]
  assert not decay["masker"]["decoder"]["bias"] and not decay["masker"]["backbone"]["ln"]["scale"]
  assert decay["masker"]["sim2mask"]["w"] and decay["masker"]["sim2mask"]["b"]
  assert decay["masker"]["decoder"]["gate"] and decay["tcli_logit_scale"]


def test_optimizer_freezes_clip_and_ust_phase_then_fresh_adamw():
  params = _toy_params()
  c = ml_collections.ConfigDict(tcl_config.get_config().optim.to_dict())
  c.update(
    base_lr=0.1,
    min_lr=0.1,
    lr_scale_reference_batch=0,
    warmup_steps=0,
    ust_steps=2,
    weight_decay=0.5,
    clip_grad=0.0,
  )
  tx, schedule = optim.make_optimizer(c, params, total_steps=10, global_batch_size=8)
  opt_state = tx.init(params)
  # No optimizer state for frozen CLIP: AdamW moments only for the 8 masker/scale leaves.
  moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.dtype == jnp.float32)
  trainable = sum(
    x.size
    for k, x in jax.tree_util.tree_leaves_with_path(params)
    if "clip" not in jax.tree_util.keystr(k)
  )
  assert moments == 2 * trainable
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)
  history = [params]
  for _ in range(3):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  p0, p2, p3 = history[0], history[2], history[3]
  a = 0.3 / (0.3 + 1e-6)  # Adam direction for a constant gradient (eps 1e-6), any step
  # CLIP never moves.
  np.testing.assert_array_equal(p3["clip"]["visual"]["kernel"], p0["clip"]["visual"]["kernel"])
  # Masker backbone: frozen for steps 0 and 1 (no update, no decay) ...
  np.testing.assert_array_equal(p2["masker"]["backbone"]["kernel"], 2.0)
  # ... then its first AdamW step is a *fresh* one (bias correction from 1, as torch's per-param
  # state): update = lr * (g / (|g| + eps) + wd * p) = 0.1 * (a + 0.5 * 2).
  np.testing.assert_allclose(
    p3["masker"]["backbone"]["kernel"], 2.0 - 0.1 * (a + 0.5 * 2.0), rtol=1e-6
  )
  np.testing.assert_allclose(p3["masker"]["backbone"]["ln"]["scale"], 1.0 - 0.1 * a, rtol=1e-6)
  # The decoder trains from step 0: three Adam steps on a constant gradient, decay on kernels.
  k = 1.0
  for _ in range(3):
    k = k - 0.1 * (a + 0.5 * k)
  np.testing.assert_allclose(p3["masker"]["decoder"]["kernel"], k, rtol=1e-5)  # f32 moments
  np.testing.assert_allclose(p3["masker"]["decoder"]["bias"], -0.3 * a, rtol=1e-5)


def test_grad_clipping_excludes_frozen_and_ust_leaves():
  params = _toy_params()
  c = ml_collections.ConfigDict(tcl_config.get_config().optim.to_dict())
  c.update(lr_scale_reference_batch=0, ust_steps=5, clip_grad=1.0)
  labels = optim.param_labels(params, c.frozen_regex, c.ust_regex)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 2.0), params)
  # 12 trainable scalars (decoder 6 + 2 + 1, sim2mask 2, scale 1) with gradient 2.
  np.testing.assert_allclose(
    optim.trainable_grad_norm(grads, labels, 0, 5), 2 * math.sqrt(12), rtol=1e-6
  )
  # After UST the backbone's 6 scalars count too.
  np.testing.assert_allclose(
    optim.trainable_grad_norm(grads, labels, 5, 5), 2 * math.sqrt(18), rtol=1e-6
  )


# ------------------------------------------------------------------------------------------------
# Sharded step == single-device step
# ------------------------------------------------------------------------------------------------


def _train_steps(config, devices, params, batch, steps=2):
  model = kinds.build_model(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  tx, schedule = optim.make_optimizer(
    config.optim, params, total_steps=config.total_steps, global_batch_size=config.batch_size
  )
  labels = optim.param_labels(params, config.optim.frozen_regex, config.optim.ust_regex)
  state = step_lib.create_train_state(params, jax.random.key(1), tx)
  state_sharding = sharding.state_shardings(mesh, jax.eval_shape(lambda: state), config.mesh)
  with jax.set_mesh(mesh):
    state = jax.device_put(state, state_sharding)
    batch = sharding.to_global(batch, sharding.data_sharding(mesh))
    step = step_lib.make_jit_train_step(
      model=model,
      tx=tx,
      labels=labels,
      schedule=schedule,
      config=config,
      state_sharding=state_sharding,
      batch_sharding=sharding.data_sharding(mesh),
      repl=sharding.repl_sharding(mesh),
    )
    for _ in range(steps):  # the second step sees updated params and AdamW moments
      state, metrics, _ = step(state, batch)
  return jax.device_get(state.params), jax.device_get(metrics), state_sharding


def visible_update_config(**overrides) -> ml_collections.ConfigDict:
  """small_config with a constant lr of 1e-2 and every masker parameter trained from step 0.

  Adam's eps is raised to 1e-4 so that an update is a smooth function of its gradient: with
  1e-6, elements whose gradient is ~1e-6 amplify float32 reduction-order noise (gradients agree
  to 1e-5) into update differences of a few % of lr.
  """
  c = small_config(**overrides)
  c.optim.update(
    base_lr=1e-2, min_lr=1e-2, lr_scale_reference_batch=0, warmup_steps=0, ust_steps=0, eps=1e-4
  )
  return c


def flat(tree) -> dict:
  """{path string: leaf} (labels trees have string leaves)."""
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_leaves_close(got: dict, want: dict, what: str, rel=1e-3):
  """Each float leaf: ||got - want|| <= rel * ||want||. Relative per leaf, so that no leaf's scale
  hides it (an absolute atol passes a whole leaf of Adam second moments ~1e-10), and a few
  elements near a kink (a ReLU, a threshold) that float32 noise sends the other way after
  several steps do not fail it. Other leaves (step, rng key data) are compared exactly."""
  assert sorted(got) == sorted(want), what
  for k in want:
    a, b = np.asarray(got[k]), np.asarray(want[k])
    if not np.issubdtype(b.dtype, np.floating):
      np.testing.assert_array_equal(a, b, err_msg=f"{what}: {k}")
      continue
    assert a.shape == b.shape, (what, k, a.shape, b.shape)
    err = np.linalg.norm((a - b).ravel().astype(np.float64))
    assert err <= rel * np.linalg.norm(b.ravel().astype(np.float64)), (
      f"{what}: {k}: |got - want| = {err:.3g}, {err / max(np.linalg.norm(b), 1e-30):.3g} "
      f"of |want|, above {rel}"
    )


def assert_same_updates(
  got: dict, want: dict, init: dict, labels: dict, what: str, min_move=5e-4, rel=1e-3
):
  """Flat param dicts: got - init == want - init for every trained leaf (assert_leaves_close),
  every trained leaf moved by at least `min_move` somewhere (an Adam step at lr 1e-2 moves
  elements by up to 1e-2, float32 noise is ~1e-7), frozen leaves did not move."""
  assert sorted(got) == sorted(want) == sorted(init) == sorted(labels), what
  trained = {k for k in init if labels[k] != optim.FROZEN}
  for k in set(init) - trained:
    np.testing.assert_array_equal(got[k], init[k], err_msg=f"{what}: frozen {k} moved")
    np.testing.assert_array_equal(want[k], init[k], err_msg=f"{what}: frozen {k} moved")
  updates = {k: np.asarray(want[k], np.float64) - init[k] for k in trained}
  for k in trained:
    assert np.abs(updates[k]).max() >= min_move, (what, k, np.abs(updates[k]).max())
  assert_leaves_close(
    {k: np.asarray(got[k], np.float64) - init[k] for k in trained}, updates, f"{what}: update", rel
  )
  assert len(trained) >= 30 and len(trained) < len(init), (len(trained), len(init))


@pytest.mark.parametrize("fsdp", [1, 2])
def test_eight_device_step_equals_one_device_step(fsdp):
  config = visible_update_config()
  model = kinds.build_model(config)
  params = jax.device_get(jax.jit(model.init)(jax.random.key(0)))
  labels = optim.param_labels(params, config.optim.frozen_regex, config.optim.ust_regex)
  batch = next(FakeIterator(config.batch_size, 32))
  ref_params, ref_metrics, _ = _train_steps(config, jax.devices()[:1], params, batch)

  config.mesh = tcl_config.common.mesh_config(fsdp)
  config.mesh.fsdp_min_size = 0
  got_params, got_metrics, shardings = _train_steps(config, jax.devices(), params, batch)
  if fsdp > 1:  # really sharded: e.g. the decoder conv kernel [3, 3, 32, 32] over fsdp
    spec = shardings.params["masker"]["decoder"]["net_0"]["conv"]["conv"]["kernel"].spec
    assert "fsdp" in tuple(spec)
  assert np.isfinite(ref_metrics["loss"]) and ref_metrics["loss"] > 0
  np.testing.assert_allclose(ref_metrics["lr"], 1e-2, rtol=1e-6)
  # The last step's metrics: its loss is computed on the params the first update produced.
  for k in ("loss", "grad_norm", "lr") + tcl_lib.LOSS_TERMS:
    np.testing.assert_allclose(got_metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # rel 5e-3: the image embedding's TV term has a kink (|dy| at 0) where nearest upsampling left
  # near-equal neighbours (|dy| down to 1e-7, float32 noise between meshes 1.4e-6); one |dy| that
  # takes the other sign on 8 devices moves the last decoder block's updates by 2e-3 (measured
  # with fsdp=2 after the chunked objective's reordering). A sharding mistake moves them by O(1).
  assert_same_updates(
    flat(got_params), flat(ref_params), flat(params), flat(labels), f"fsdp={fsdp}", rel=5e-3
  )


def test_mesh_shapes_and_fsdp_rule():
  mesh = sharding.make_mesh(tcl_config.common.mesh_config(4))
  assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {"data": 2, "fsdp": 4}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sharding.data_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  tree = {
    "big": jax.ShapeDtypeStruct((6, 8), jnp.float32),
    "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32),
    "scalar": jax.ShapeDtypeStruct((), jnp.float32),
  }
  mc = tcl_config.common.mesh_config(4)
  mc.fsdp_min_size = 0
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(mesh, tree, mc))
  assert specs == {
    "big": jax.sharding.PartitionSpec(None, "fsdp"),  # largest divisible dim
    "odd": jax.sharding.PartitionSpec(),
    "scalar": jax.sharding.PartitionSpec(),
  }
  with pytest.raises(ValueError, match="do not split"):
    sharding.make_mesh(ml_collections.ConfigDict(dict(shape=(-1, 3), axes=("data", "fsdp"))))


def _state_and_jit_step(config, model, params):
  """A fresh train state of `params` and the jitted `train_step` (no mesh), with the labels."""
  tx, schedule = optim.make_optimizer(
    config.optim, params, total_steps=config.total_steps, global_batch_size=config.batch_size
  )
  labels = optim.param_labels(params, config.optim.frozen_regex, config.optim.ust_regex)
  state = step_lib.create_train_state(params, jax.random.key(1), tx)
  step = jax.jit(
    functools.partial(
      step_lib.train_step,
      loss_fn=model.loss,
      tx=tx,
      labels=labels,
      schedule=schedule,
      ust_steps=config.optim.ust_steps,
    )
  )
  return state, step, labels


def _steps_on_one_device(config, params, batch, steps=2):
  """`steps` jitted train steps without a mesh; returns (params, last metrics, jaxpr text)."""
  model = kinds.build_model(config)
  state, step, labels = _state_and_jit_step(config, model, params)
  jaxpr = str(jax.make_jaxpr(step)(state, batch))
  for _ in range(steps):
    state, metrics, _ = step(state, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # fp32 master copy
  assert metrics["loss"].dtype == jnp.float32 and metrics["loss"].shape == ()
  return flat(jax.device_get(state.params)), jax.device_get(metrics), jaxpr


def test_remat_and_bf16_steps_run_and_match_float32():
  assert base.resolve_compute_dtype("auto") == jnp.float32  # CPU default
  config = visible_update_config()
  params = jax.device_get(jax.jit(kinds.build_model(config).init)(jax.random.key(0)))
  init = flat(params)
  labels = flat(optim.param_labels(params, config.optim.frozen_regex, config.optim.ust_regex))
  batch = next(FakeIterator(config.batch_size, 32))
  runs = {}
  for dtype, remat in (("float32", False), ("float32", True), ("bfloat16", False)):
    config.compute_dtype, config.remat = dtype, remat
    runs[dtype, remat] = _steps_on_one_device(config, params, batch)
  plain, remat, bf16 = runs["float32", False], runs["float32", True], runs["bfloat16", False]
  # The switches reach the model: a checkpoint (remat) region, bf16 arithmetic.
  # (The objective's caption-chunk loop is a checkpoint region with or without the switch.)
  assert remat[2].count("remat") > plain[2].count("remat")
  assert "bf16" in bf16[2] and "bf16" not in plain[2]
  # Rematerialisation recomputes the same float32 ops: equal within float32 noise.
  for k in ("loss", "grad_norm") + tcl_lib.LOSS_TERMS:
    np.testing.assert_allclose(remat[1][k], plain[1][k], rtol=1e-6, err_msg=k)
  assert_same_updates(remat[0], plain[0], init, labels, "remat", rel=1e-6)
  # bf16 compute (fp32 params, moments and loss): close to float32, not equal to it. Measured
  # (2-core CPU, this test's settings): loss 0.49%, grad_norm 2.0%, the two steps' updates 14%
  # apart (Adam turns bf16's 0.4% rounding of small gradients into large changes of their
  # elements' updates). The Gumbel draw moves these: over state keys 1-8, loss 0.01-1.3%,
  # grad_norm 0.9-4.4%, updates 9-18% (the [B, B, H', W'] draw before obj26: up to 3.4%, 10.6%,
  # 22%; key 1 then gave 0.18%, 0.48%, 11%). The bounds cover the spread.
  for k, rel in (("loss", 1.5e-2), ("grad_norm", 5e-2)):
    np.testing.assert_allclose(bf16[1][k], plain[1][k], rtol=rel, err_msg=k)
  assert bf16[1]["loss"] != plain[1]["loss"]
  trained = [k for k in init if labels[k] != optim.FROZEN]
  want = np.concatenate([(plain[0][k] - init[k]).ravel() for k in trained])
  got = np.concatenate([(bf16[0][k] - init[k]).ravel() for k in trained])
  assert np.linalg.norm(got - want) < 0.25 * np.linalg.norm(want)


# ------------------------------------------------------------------------------------------------
# Checkpoints: exact resume, non-finite stop
# ------------------------------------------------------------------------------------------------


def _losses(history):
  return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
  n = 3
  config = small_config(total_steps=2 * n, checkpoint_every_steps=n, log_every_steps=1)
  config.optim.lr_scale_reference_batch = 0  # peak lr 1e-2: updates far above float32 noise
  # Sharded params and AdamW state (fsdp over 2 of the 8 devices) through save and restore.
  config.mesh = tcl_config.common.mesh_config(2)
  config.mesh.fsdp_min_size = 0
  straight, straight_hist = train.train_and_evaluate(
    config, str(tmp_path / "straight"), train_iter=FakeIterator(8, 32)
  )

  # Preempted after n steps: a SIGTERM while the n-th batch is served stops the run after the
  # n-th step (train.py's between-steps check), with a checkpoint.
  class SigtermAtBatchN(FakeIterator):
    def __next__(self):
      if self.i == n - 1:
        os.kill(os.getpid(), signal.SIGTERM)
      return super().__next__()

  preempted = SigtermAtBatchN(8, 32)
  _, hist = train.train_and_evaluate(config, str(tmp_path / "resumed"), train_iter=preempted)
  assert max(_losses(hist)) == n and preempted.i == n
  it = FakeIterator(8, 32)
  resumed, resumed_hist = train.train_and_evaluate(config, str(tmp_path / "resumed"), train_iter=it)
  assert it.i == 2 * n  # the iterator was fast-forwarded to batch n, then served n more
  want, got = _losses(straight_hist), _losses(resumed_hist)
  assert sorted(got) == list(range(n + 1, 2 * n + 1))
  for s in got:
    np.testing.assert_allclose(got[s], want[s], rtol=0, atol=1e-6, err_msg=f"step {s}")
  assert int(resumed.step) == 2 * n
  # Relative per leaf: Adam's second moments are ~1e-9, below any useful absolute tolerance.
  assert_leaves_close(
    flat(jax.device_get(resumed.params)), flat(jax.device_get(straight.params)), "params", rel=1e-6
  )
  assert_leaves_close(
    flat(jax.device_get(resumed.opt_state)),
    flat(jax.device_get(straight.opt_state)),
    "opt_state",
    rel=1e-6,
  )
  # A training workdir is a checkpoint users can evaluate: its latest parameters load by path.
  from tcl_jax.weights import loading  # pylint: disable=g-import-not-at-top

  cfg, params = loading.load_any(str(tmp_path / "resumed"))
  assert cfg.ie_freeze == config.model.ie_freeze
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_while_waiting_for_data_checkpoints_the_steps_done(tmp_path):
  # Two steps, then the input stalls (a file system that stops answering) and SIGTERM arrives:
  # the run stops without a third batch and keeps steps 1-2 in a checkpoint whose input state is
  # the one before the read that never finished.
  import threading  # pylint: disable=g-import-not-at-top

  n, release = 2, threading.Event()

  class StallsAfterN(FakeIterator):
    def __next__(self):
      if self.i == n:
        os.kill(os.getpid(), signal.SIGTERM)
        release.wait(120)
      return super().__next__()

  config = small_config(total_steps=10, checkpoint_every_steps=1000, log_every_steps=1)
  it = StallsAfterN(8, 32)
  try:
    state, hist = train.train_and_evaluate(config, str(tmp_path), train_iter=it)
    assert not release.is_set() and it.i == n  # returned while the read still waits
  finally:
    release.set()
  assert int(state.step) == n and sorted(_losses(hist)) == [1, 2]
  mngr = checkpointing.create_checkpoint_manager(str(tmp_path), config.checkpoint)
  assert mngr.all_steps() == [n]
  restored = mngr.restore(n, args=ocp.args.Composite(input=ocp.args.JsonRestore()))
  assert restored["input"] == {"process_count": 1, "processes": {"0": {"i": n}}}
  mngr.close()


def test_non_finite_stop_keeps_last_good_and_best_checkpoints(tmp_path, monkeypatch):
  # state.step == 3 is the 4th update: steps 1..3 are good and checkpointed, step 4 is NaN.
  config = small_config(
    total_steps=8,
    checkpoint_every_steps=1,
    log_every_steps=1,
    debug_nan_at_step=3,
    eval_every_steps=1,
    image_log_every_steps=2,
  )
  config.checkpoint.keep, config.checkpoint.keep_best = 1, 1
  # Evaluation is stubbed (tests/test_evaluate*.py cover it): mIoU 5, 9, 2 at steps 1, 2, 3.
  mious = iter([5.0, 9.0, 2.0, 1.0])
  monkeypatch.setattr(
    train,
    "run_evaluation",
    lambda *a, **k: (lambda m: {"voc20": {"miou": m}, "context59": {"miou": None}, "average": m})(
      next(mious)
    ),
  )
  with pytest.raises(train.NonFiniteLossError, match="Non-finite loss.* step 4.*step 3"):
    train.train_and_evaluate(config, str(tmp_path), train_iter=FakeIterator(8, 32))
  mngr = checkpointing.create_checkpoint_manager(str(tmp_path), config.checkpoint)
  assert mngr.latest_step() == 3
  assert sorted(mngr.all_steps()) == [2, 3]  # the best (mIoU 9) and the latest good one
  restored = mngr.restore(
    3, args=ocp.args.Composite(state=ocp.args.StandardRestore(), input=ocp.args.JsonRestore())
  )
  leaves = jax.tree.leaves(restored["state"]["params"])
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
  assert int(restored["state"]["step"]) == 3
  assert restored["input"] == {"process_count": 1, "processes": {"0": {"i": 3}}}
  mngr.close()
  # TensorBoard got the eval scalars and the mask image grid.
  from tensorboard.backend.event_processing import (
    event_accumulator,  # pylint: disable=g-import-not-at-top
  )

  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  tags = events.Tags()["tensors"]
  for tag in (
    "train/loss",
    "train/tcli_loss",
    "train/grad_norm",
    "train/lr",
    "steps_per_sec",
    "eval/voc20/miou_percent",
    "eval/average_miou_percent",
    "train/masks",
    "input/bad_record",
  ):
    assert tag in tags, tag
  assert "eval/context59/miou_percent" not in tags  # None results are skipped
  assert [e.step for e in events.Tensors("eval/voc20/miou_percent")] == [1, 2, 3]
  assert [e.step for e in events.Tensors("train/masks")] == [2]


def test_mask_overlay_grid():
  images = np.zeros((2, 8, 8, 3), np.float32)
  masks = np.array([[[1.0, 0.0], [0.0, 0.25]], [[0.0, 0.0], [0.0, 1.0]]])
  grid = summaries.mask_overlay_grid(images, masks, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  assert grid.shape == (24, 16, 3) and grid.dtype == np.uint8
  assert grid[0, 0, 0] == 128  # un-normalized grey
  assert grid[8, 0, 0] == 255 and grid[8, 4, 0] == 0  # mask row: top-left quarter on
  assert grid[8 + 7, 7, 0] == 64  # soft value 0.25
  assert grid[16, 0, 0] == 128 and grid[16, 4, 0] == 0  # image * mask
  assert grid[8 + 7, 8 + 7, 0] == 255  # second mask: bottom-right
  hard = summaries.mask_overlay_grid(images, masks, (0.5,) * 3, (0.25,) * 3, threshold=0.5)
  assert hard[8 + 7, 7, 0] == 0 and hard[8, 0, 0] == 255  # the original's (mask > 0.5)


# ------------------------------------------------------------------------------------------------
# The update descends, and the per-step noise follows the step
# ------------------------------------------------------------------------------------------------


class FixedBatch(FakeIterator):
  """FakeIterator serving its first batch every time (the position still counts)."""

  def __next__(self):
    i, self.i = self.i, 0
    batch = super().__next__()
    self.i = i + 1
    return batch


def test_a_few_steps_of_the_loop_lower_the_loss_on_a_fixed_batch(tmp_path):
  # The real loop (train_and_evaluate: optimizer, sharded jitted step, logging) on one batch:
  # descent lowers the loss; an ascending update (p - u) raises it.
  steps = 8
  config = visible_update_config(total_steps=steps, checkpoint_every_steps=1000, log_every_steps=1)
  _, hist = train.train_and_evaluate(config, str(tmp_path), train_iter=FixedBatch(8, 32))
  losses = _losses(hist)
  assert sorted(losses) == list(range(1, steps + 1))
  first, last = losses[1], np.mean([losses[steps - 1], losses[steps]])
  # Measured (2-core CPU): 1.27 at step 1, 0.53 at step 8 (-57%); the Gumbel noise alone moves
  # this loss by 1-4% from step to step (the zero-lr test below).
  assert last < 0.75 * first, losses


def _fixed_noise_batch(config):
  """A FakeIterator batch with fixed Gumbel noise ("gumbel_uniform", the replay entry), so its
  loss is a deterministic function of the parameters."""
  batch = next(FakeIterator(config.batch_size, 32))
  grid = 32 // config.model.clip["vision_patch_size"] * 4  # the masks' side: patch grid x 4
  batch["gumbel_uniform"] = (
    np.random.default_rng(5).uniform(1e-3, 1 - 1e-3, (8, 8, grid, grid)).astype(np.float32)
  )
  return batch


def open_gates(params):
  """The decoder's zero-init gates set to 0.5 (as a trained masker's), so that every decoder
  leaf gets a gradient."""
  return jax.tree_util.tree_map_with_path(
    lambda k, v: jnp.full_like(v, 0.5) if "gate" in jax.tree_util.keystr(k) else v, params
  )


def test_the_update_opposes_the_gradient_in_every_trained_leaf():
  # The first AdamW step without decay is -lr * g / (|g| + eps) per element: its inner product
  # with the gradient is negative in every leaf, whatever clipping does to the scale.
  config = visible_update_config()
  config.optim.weight_decay = 0.0
  model = kinds.build_model(config)
  params = open_gates(jax.device_get(jax.jit(model.init)(jax.random.key(0))))
  batch = _fixed_noise_batch(config)
  grads = jax.jit(jax.grad(lambda p: model.loss(p, batch, None)[0]))(params)
  state, step, labels = _state_and_jit_step(config, model, params)
  new_state, metrics, _ = step(state, batch)
  before, after, g, lab = (
    flat(params),
    flat(jax.device_get(new_state.params)),
    flat(grads),
    flat(labels),
  )
  cosines = {}
  for k in before:
    u = np.asarray(after[k], np.float64) - before[k]
    if lab[k] == optim.FROZEN:
      assert not u.any(), k
      continue
    gk = np.asarray(g[k], np.float64).ravel()
    assert np.linalg.norm(gk) > 0, k
    cosines[k] = float(-u.ravel() @ gk / (np.linalg.norm(u) * np.linalg.norm(gk)))
  assert len(cosines) >= 30
  # Measured (2-core CPU): the cosine of -update and gradient is 0.68 to 1 over the leaves.
  bad = {k: c for k, c in cosines.items() if not c > 0.3}
  assert not bad, bad
  # The loss the step reported is the one at the old parameters, and the step lowered it.
  loss_fn = jax.jit(lambda p: model.loss(p, batch, None)[0])
  np.testing.assert_allclose(metrics["loss"], loss_fn(params), rtol=1e-5)
  assert float(loss_fn(new_state.params)) < float(metrics["loss"])


def test_step_noise_differs_between_steps_and_is_reproduced_on_resume(tmp_path):
  # Zero learning rate: the parameters stay put, so the loss of the same batch changes from step
  # to step only through the Gumbel noise drawn from fold_in(rng, step).
  config = small_config()
  config.optim.update(base_lr=0.0, min_lr=0.0)
  model = kinds.build_model(config)
  params = jax.device_get(jax.jit(model.init)(jax.random.key(0)))
  batch = next(FakeIterator(config.batch_size, 32))
  tx, schedule = optim.make_optimizer(
    config.optim, params, total_steps=config.total_steps, global_batch_size=config.batch_size
  )
  labels = optim.param_labels(params, config.optim.frozen_regex, config.optim.ust_regex)
  step = jax.jit(
    functools.partial(
      step_lib.train_step,
      loss_fn=model.loss,
      tx=tx,
      labels=labels,
      schedule=schedule,
      ust_steps=config.optim.ust_steps,
    )
  )
  state = step_lib.create_train_state(params, jax.random.key(1), tx)
  losses, states = [], [state]
  for _ in range(3):
    state, metrics, _ = step(state, batch)
    losses.append(float(metrics["loss"]))
    states.append(state)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)  # nothing moved: only the noise can change the loss
  # The same state gives the same loss (the step is deterministic) ...
  assert float(step(states[0], batch)[1]["loss"]) == losses[0]
  # ... and each step draws new noise. Measured (2-core CPU): 1.331, 1.289, 1.273, the closest
  # two 0.017 (1.2%) apart.
  spread = min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1 :])
  assert spread > 1e-3 * abs(losses[0]), losses
  # Resume: the state at step 2 through the loop's checkpoint save and restore draws the noise
  # of the uninterrupted run's third step.
  mngr = checkpointing.create_checkpoint_manager(str(tmp_path), config.checkpoint)
  checkpointing.save(mngr, 2, states[2], {"i": 2})
  mngr.wait_until_finished()
  abstract = jax.eval_shape(lambda: states[2])
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored, _ = checkpointing.restore(
    mngr, 2, checkpointing.abstract_with_shardings(abstract, jax.tree.map(lambda _: one, abstract))
  )
  mngr.close()
  assert int(restored.step) == 2
  assert float(step(restored, batch)[1]["loss"]) == losses[2]
  # The noise is a function of the state's (rng, step) alone: a fresh state set to step 2 too.
  fresh = step_lib.create_train_state(params, jax.random.key(1), tx).replace(
    step=jnp.asarray(2, jnp.int32)
  )
  assert float(step(fresh, batch)[1]["loss"]) == losses[2]
