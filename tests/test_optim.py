"""The optimizer exactly as training builds it (`optim.make_optimizer` from a config), on the real
TCL parameter tree with the real regexes, against a plain-numpy model of what the original does
with torch: `set_weight_decay` on torch names, `clip_grad_norm_` over the parameters that have
gradients, `AdamW` with per-parameter state, `SequentialLR(LinearLR, CosineAnnealingLR)`.

The parity tool's trajectory replay checks the whole optimizer against the original's own run;
each test here isolates one piece so that a failure says which one broke.
"""

import math

from conftest import load_config_module
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tcl_jax import kinds
from tcl_jax.train import checkpointing
from tcl_jax.train import optim
from tcl_jax.train import step as step_lib
from tcl_jax.weights import key_maps as convert_maps

tcl_config = load_config_module("tcl")

PEAK, LOW, WARMUP, UST, TOTAL, WD, EPS = 1e-2, 1e-3, 4, 5, 16, 0.05, 1e-6
B1, B2 = 0.9, 0.999


def _config(clip_grad=0.0) -> ml_collections.ConfigDict:
  c = tcl_config.get_config("smoke")
  c.model.clip = dict(
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
  c.model.ie_freeze = 1
  c.total_steps = TOTAL
  c.optim = tcl_config.common.tcl_optim(
    base_lr=PEAK,
    min_lr=LOW,
    lr_scale_reference_batch=0,
    warmup_steps=WARMUP,
    ust_steps=UST,
    weight_decay=WD,
    clip_grad=clip_grad,
    eps=EPS,
    b1=B1,
    b2=B2,
  )
  return c


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def model():
  config = _config()
  m = kinds.build_model(config)
  params = jax.device_get(m.init(jax.random.key(0)))
  return m.cfg, params


def _torch_view(cfg, params):
  """Per leaf (in tree order): its official torch name and torch shape."""
  key_map = convert_maps.tcl_key_map(cfg)
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name, layout = key_map[tuple(p.key for p in path)]
    shape = convert_maps.TO_TORCH[layout](np.zeros(leaf.shape, np.float32)).shape
    out.append((name, shape))
  return out


class TorchAdamW:
  """What the original's optimizer does, leaf by leaf, in float64 numpy.

  Groups come from the torch names (the original's `set_train`): `clip_*` never has a gradient;
  the masker's backbone copy has none before step UST (requires_grad=False); the rest always.
  Decay: `len(shape) == 1 or name.endswith(".bias")` -> 0 (so 0-d scalars ARE decayed).
  """

  def __init__(self, torch_view, clip_grad=0.0):
    self.names = [n for n, _ in torch_view]
    self.decay = [not (len(s) == 1 or n.endswith(".bias")) for n, s in torch_view]
    self.clip_grad = clip_grad
    self.state = {}  # leaf index -> (t, m, v): created at a parameter's first gradient
    self.step = 0
    self.clipped = []  # per step: did clip_grad_norm_ scale the gradients

  def has_grad(self, i, step):
    n = self.names[i]
    if n.startswith("clip_"):
      return False
    if n.startswith("masker.image_encoder.backbone."):
      return step >= UST
    return True

  @staticmethod
  def lr(step):
    # SequentialLR: LinearLR(1e-4 -> 1) for WARMUP steps; at the milestone the cosine restarts
    # from its own step 0 (= its base rate, the peak); CosineAnnealingLR(T_max=TOTAL-WARMUP).
    if step < WARMUP:
      return PEAK * (1e-4 + (1 - 1e-4) * step / WARMUP)
    t = min(step - WARMUP, TOTAL - WARMUP)
    return LOW + (PEAK - LOW) * (1 + math.cos(math.pi * t / (TOTAL - WARMUP))) / 2

  def update(self, grads, params):
    """-> the change that one optimizer.step() makes to each parameter (float64)."""
    live = [i for i in range(len(grads)) if self.has_grad(i, self.step)]
    g = {i: np.asarray(grads[i], np.float64) for i in live}
    if self.clip_grad:
      norm = math.sqrt(sum(float(np.sum(g[i] ** 2)) for i in live))
      coef = self.clip_grad / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_
      self.clipped.append(coef < 1)
      if coef < 1:
        g = {i: x * coef for i, x in g.items()}
    lr = self.lr(self.step)
    out = [np.zeros(np.shape(p)) for p in params]
    self.scale = [0.0] * len(params)  # per tensor: ||decay term|| + ||Adam term||
    for i in live:
      t, m, v = self.state.get(i, (0, 0.0, 0.0))
      t, m, v = t + 1, B1 * m + (1 - B1) * g[i], B2 * v + (1 - B2) * g[i] ** 2
      self.state[i] = (t, m, v)
      p = np.asarray(params[i], np.float64)
      decayed = p * (1 - lr * WD) if self.decay[i] else p
      denom = np.sqrt(v) / math.sqrt(1 - B2**t) + EPS
      adam = lr / (1 - B1**t) * m / denom
      out[i] = decayed - adam - p
      self.scale[i] = float(np.linalg.norm(decayed - p) + np.linalg.norm(adam))
    self.step += 1
    return out


def _run_ours(tx, params, grad_seq, opt_state=None, reference=None, view=None):
  """Applies `grad_seq` through tx exactly as train_step does (p + u). With a `reference`
  (TorchAdamW), each step's updates are checked against the original's for the same params."""
  opt_state = tx.init(params) if opt_state is None else opt_state
  update = jax.jit(tx.update)
  for k, grads in enumerate(grad_seq):
    updates, opt_state = update(grads, opt_state, params)
    if reference is not None:
      want = reference.update(jax.tree.leaves(grads), jax.tree.leaves(params))
      _assert_same_updates(jax.tree.leaves(updates), want, reference.scale, view, f"step {k}: ")
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return params, opt_state


def _assert_same_updates(ours, ref, scales, view, where="", rtol=1e-4):
  """Per tensor ||u_ours - u_ref|| <= rtol (||decay term|| + ||Adam term||), and exactly zero
  where the original does not touch the tensor. (Relative to the terms, not their sum, which can
  cancel; optax computes AdamW's bias corrections in float32, ~1e-5 relative. The effects under
  test, a wrong rate, decay, clip or bias correction, are >= 5e-3 of the terms.)"""
  for (name, _), a, b, scale in zip(view, ours, ref, scales):
    a = np.asarray(a, np.float64)
    if scale == 0:
      np.testing.assert_array_equal(a, 0.0, err_msg=where + name)
    else:
      err = np.linalg.norm(a - b) / scale
      assert err <= rtol, f"{where}{name}: relative error of the update {err:.3g}"


def _grads(params, seed, scale=1.0, ust_scale=None):
  """Random gradients; `ust_scale` sets the masker backbone's separately (it must not matter
  while UST holds, as the original computes none)."""
  rng = np.random.default_rng(seed)

  def one(path, p):
    s = scale
    if ust_scale is not None and optim.path_str(path).startswith("masker/backbone/"):
      s = ust_scale
    return jnp.asarray(rng.normal(size=p.shape) * s, jnp.float32)

  return jax.tree_util.tree_map_with_path(one, params)


def test_decay_mask_on_the_real_paths_is_the_originals_rule(model):
  cfg, params = model
  view = _torch_view(cfg, params)
  ours = jax.tree.leaves(optim.decay_mask(params))
  want = [not (len(s) == 1 or n.endswith(".bias")) for n, s in view]
  assert ours == want
  by_name = dict(zip([n for n, _ in view], ours))
  # The odd cases: 0-d scalars (sim2mask w/b, gates, logit scales) are decayed, as in the original.
  assert by_name["masker.sim2mask.w"] and by_name["masker.sim2mask.b"]
  assert by_name["tcli_loss.logit_scale"]
  assert by_name["masker.image_encoder.decoder.decoder.net.0.conv.gate.gate"]
  assert not by_name["masker.image_encoder.backbone.transformer.resblocks.1.attn.in_proj_bias"]


def test_labels_on_the_real_paths(model):
  cfg, params = model
  c = _config().optim
  labels = jax.tree.leaves(optim.param_labels(params, c.frozen_regex, c.ust_regex))
  for (name, _), label in zip(_torch_view(cfg, params), labels):
    want = (
      optim.FROZEN
      if name.startswith("clip_")
      else optim.UST
      if name.startswith("masker.image_encoder.backbone.")
      else optim.TRAINABLE
    )
    assert label == want, name


@pytest.mark.parametrize("step", [0, 2, WARMUP, UST, 9])
def test_applied_lr_and_adamw_step_at_warmup_switch_and_cosine(model, step):
  """Zero gradients up to `step` (no moments, only decay), then one real gradient: the update is
  torch's AdamW at that step's rate, with a fresh bias correction for the backbone at UST."""
  cfg, params = model
  config = _config()
  tx, schedule = optim.make_optimizer(config.optim, params, total_steps=TOTAL, global_batch_size=8)
  np.testing.assert_allclose(float(schedule(step)), TorchAdamW.lr(step), rtol=1e-6)
  zeros = jax.tree.map(jnp.zeros_like, params)
  g = _grads(params, seed=step)
  view = _torch_view(cfg, params)
  ours, _ = _run_ours(tx, params, [zeros] * step + [g], reference=TorchAdamW(view), view=view)
  # The frozen CLIP towers never move; the backbone moves only from step UST on.
  for (name, _), a, p in zip(view, jax.tree.leaves(ours), jax.tree.leaves(params)):
    if name.startswith("clip_") or (
      name.startswith("masker.image_encoder.backbone.") and step < UST
    ):
      np.testing.assert_array_equal(a, p, err_msg=name)


@pytest.mark.parametrize("scale", [10.0, 1e-3])
def test_clipping_scales_exactly_when_the_trainable_norm_exceeds_the_threshold(model, scale):
  """Three steps across the UST switch with a threshold of 1: gradients of norm ~10x it are
  clipped, of ~1e-3x are not. The backbone's gradients are huge during UST: they must not enter
  the norm (the original computes none), and they must from the switch on."""
  cfg, params = model
  config = _config(clip_grad=1.0)
  tx, _ = optim.make_optimizer(config.optim, params, total_steps=TOTAL, global_batch_size=8)
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  per = scale / math.sqrt(n)
  # Steps UST-2 and UST-1: the backbone's gradients are huge but do not exist for the original.
  seq = [_grads(params, seed=10 + k, scale=per, ust_scale=1e3 if k < 2 else None) for k in range(3)]
  view = _torch_view(cfg, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  warm = [zeros] * (UST - 2)  # then steps UST-2, UST-1 (backbone frozen), UST (backbone joins)
  reference = TorchAdamW(view, clip_grad=1.0)
  _run_ours(tx, params, warm + seq, reference=reference, view=view)
  assert reference.clipped == [False] * len(warm) + [scale > 1] * 3


@pytest.mark.parametrize("clip_grad", [None, 2.5])
def test_the_configured_clip_threshold_is_the_one_applied(clip_grad):
  """The recipe's optimizer (configs/tcl.py; clip_grad 5.0 = the original's configs/tcl.yml:43)
  and one of threshold 2.5, on two steps: the first clipped (norm 4x the threshold), the second
  not (0.6x). Adam is blind to one scale over all steps, not to their ratio, so a threshold other
  than the configured one moves the second update. UST and frozen gradients, huge here, are not
  in the norm (the original has none for them)."""
  config = tcl_config.get_config()
  if clip_grad is not None:
    config.optim.clip_grad = clip_grad
  o = config.optim
  thr = o.clip_grad
  assert clip_grad is not None or thr == 5.0
  params = {
    "masker": {"decoder": {"kernel": jnp.zeros((4, 3))}, "backbone": {"w": jnp.zeros(5)}},
    "clip": {"w": jnp.zeros(5)},
  }
  tx, schedule = optim.make_optimizer(
    o, params, total_steps=config.total_steps, global_batch_size=config.batch_size
  )
  rng = np.random.default_rng(0)
  state, p = tx.init(params), np.zeros((4, 3))
  m, v = np.zeros((4, 3)), np.zeros((4, 3))
  for t, ratio in enumerate((4.0, 0.6)):
    g = rng.standard_normal((4, 3))
    g *= ratio * thr / np.linalg.norm(g)  # the only gradient in the norm
    grads = {
      "masker": {"decoder": {"kernel": jnp.asarray(g)}, "backbone": {"w": jnp.full(5, 1e3)}},
      "clip": {"w": jnp.full(5, 1e3)},
    }
    updates, state = tx.update(grads, state, params)
    # torch: clip_grad_norm_ (coef max / (norm + 1e-6), at most 1), then AdamW.
    g = g * min(1.0, thr / (np.linalg.norm(g) + 1e-6))
    m, v = o.b1 * m + (1 - o.b1) * g, o.b2 * v + (1 - o.b2) * g * g
    adam = m / (1 - o.b1 ** (t + 1)) / (np.sqrt(v / (1 - o.b2 ** (t + 1))) + o.eps)
    want = -float(schedule(t)) * (adam + o.weight_decay * p)
    np.testing.assert_allclose(updates["masker"]["decoder"]["kernel"], want, rtol=1e-4)
    p = p + want
    params = jax.tree.map(lambda a, u: a + u, params, updates)
    assert not np.any(updates["clip"]["w"]) and not np.any(updates["masker"]["backbone"]["w"])


def test_resume_in_the_middle_of_ust_continues_exactly(model, tmp_path):
  """Save params + optimizer state at step 2 (UST until 5) through the orbax checkpoint manager,
  restore into a fresh tree, continue to step 8: identical to the uninterrupted run."""
  _, params = model
  config = _config(clip_grad=1.0)
  tx, _ = optim.make_optimizer(config.optim, params, total_steps=TOTAL, global_batch_size=8)
  seq = [_grads(params, seed=100 + k, scale=0.05) for k in range(8)]
  straight_p, straight_s = _run_ours(tx, params, seq)

  p2, s2 = _run_ours(tx, params, seq[:2])
  state = step_lib.TrainState(
    step=jnp.asarray(2, jnp.int32), params=p2, opt_state=s2, rng=jax.random.key(0)
  )
  config.checkpoint.async_save = False
  mngr = checkpointing.create_checkpoint_manager(str(tmp_path), config.checkpoint)
  checkpointing.save(mngr, 2, state, {})
  mngr.wait_until_finished()
  abstract = jax.eval_shape(lambda: step_lib.create_train_state(params, jax.random.key(1), tx))
  restored, _ = checkpointing.restore(mngr, 2, abstract)
  assert int(restored.step) == 2
  resumed_p, resumed_s = _run_ours(tx, restored.params, seq[2:], opt_state=restored.opt_state)
  for a, b in zip(jax.tree.leaves(resumed_p), jax.tree.leaves(straight_p)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(resumed_s), jax.tree.leaves(straight_s)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And the run did move the backbone after the switch (the comparison is not vacuous).
  moved = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), straight_p["masker"], params["masker"]
  )
  assert min(jax.tree.leaves(moved["backbone"])) > 1e-5
