"""Optimizer and learning-rate schedule of TCL, as in kakaobrain/tcl (utils/optimizer.py,
utils/lr_scheduler.py, main.py), written with optax.

What the original does, and how it maps here:

* AdamW over the trainable parameters only. The CLIP encoders have `requires_grad=False`, so they
  get no update, no weight decay and no optimizer state: label "frozen" -> `optax.set_to_zero()`
  (no state) inside `optax.partition`.
* Weight decay 0 for every parameter that is 1-D or whose name ends in `.bias`; everything else,
  including the 0-d scalars (sim2mask w/b and both logit scales), is decayed. The 0-d case is a
  quirk of the original rule (`len(shape) == 1`), kept on purpose.
* UST ("decoder-only" phase): for the first `ust_steps` steps the masker's copy of the CLIP
  backbone has `requires_grad=False`. In PyTorch that means: no gradient (so it is also left out
  of the clipping norm), no update, no weight decay, and no AdamW state; when the phase ends its
  AdamW moments and its bias-correction step start from zero. Here: label "ust" ->
  its gradients are zeroed before clipping while `step < ust_steps`, and its AdamW runs inside
  `optax.transforms.conditionally_mask`, which returns zero updates and leaves the inner state
  untouched until the condition holds. Both are functions of the step counter in the optimizer
  state, so the jitted step has no Python branch and compiles once.
* Gradient clipping by global norm (`clip_grad`), then AdamW (betas, eps), then the learning rate.
  The rate is one global schedule (all param groups share the scheduler), applied after the
  partition so that it counts global steps even for the UST group.
* Schedule: `LinearLR(start_factor=1e-4)` for `warmup_steps`, then `CosineAnnealingLR(T_max =
  total - warmup, eta_min=min_lr)`. Peak and minimum rate are both scaled linearly by
  `global_batch / 4096` (main.py scales `base_lr` and `min_lr`; the warmup start is a fraction of
  the scaled peak).
"""

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

FROZEN = "frozen"
UST = "ust"
TRAINABLE = "trainable"


def path_str(path) -> str:
  """'a/b/c' for a jax tree path of dict keys / attributes / indices."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_labels(params, frozen_regex: str, ust_regex: str):
  """A tree like `params` with a label per leaf: "frozen", "ust" or "trainable".

  Args:
    params: the parameter tree (arrays or ShapeDtypeStructs).
    frozen_regex: leaves whose 'a/b/c' path matches (re.search) are never trained (CLIP).
    ust_regex: leaves matching it are frozen during the first `ust_steps` (masker backbone).
  """

  def label(path, _):
    name = path_str(path)
    if frozen_regex and re.search(frozen_regex, name):
      return FROZEN
    if ust_regex and re.search(ust_regex, name):
      return UST
    return TRAINABLE

  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params):
  """True where AdamW applies weight decay (the original's `set_weight_decay` rule).

  No decay when the parameter is 1-D or its name ends with "bias"; 0-d scalars are decayed (quirk
  of the original, whose test is `len(param.shape) == 1`).
  """

  def decays(path, x):
    name = path_str(path)
    return not (len(x.shape) == 1 or name.endswith("bias"))

  return jax.tree_util.tree_map_with_path(decays, params)


def scaled_lrs(optim_config, global_batch_size: int) -> tuple[float, float]:
  """(peak_lr, min_lr) after the original's linear scaling by global_batch / reference batch."""
  scale = 1.0
  if optim_config.get("lr_scale_reference_batch", 0):
    scale = global_batch_size / float(optim_config.lr_scale_reference_batch)
  return optim_config.base_lr * scale, optim_config.min_lr * scale


def warmup_cosine_schedule(
  peak_lr: float,
  min_lr: float,
  warmup_steps: int,
  total_steps: int,
  warmup_start_factor: float = 1e-4,
) -> Callable[[Any], jax.Array]:
  """lr(step): linear from `start_factor * peak` to `peak` over warmup, then cosine to `min_lr`.

  Matches torch `SequentialLR([LinearLR(start_factor, 1.0, warmup), CosineAnnealingLR(total -
  warmup, eta_min)], milestones=[warmup])` evaluated after `step` scheduler steps. At the
  milestone SequentialLR calls the cosine's `step(0)`, so the step at index `warmup` runs at
  exactly the peak (LinearLR never reaches its end factor itself: its last rate is at
  warmup - 1). Past `total_steps` the rate stays at `min_lr`. Checked against the original's
  recorded rates by the parity tool's trajectory replay.
  """
  cos_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps > 0:
      frac = jnp.minimum(step / warmup_steps, 1.0)
      warm = peak_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * frac)
    else:
      warm = jnp.asarray(peak_lr, jnp.float32)
    t = jnp.clip(step - warmup_steps, 0.0, cos_steps)
    cos = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * t / cos_steps))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def _zero_until(threshold: int) -> optax.GradientTransformation:
  """Zeroes all updates while the call counter is below `threshold` (no other state)."""
  return optax.transforms.conditionally_mask(optax.identity(), lambda step: step >= threshold)


def make_optimizer(
  optim_config, params, *, total_steps: int, global_batch_size: int
) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
  """Builds the TCL optimizer for `params` (a tree of arrays or ShapeDtypeStructs).

  Args:
    optim_config: `config.optim` (base_lr, min_lr, warmup_steps, ust_steps, weight_decay,
      clip_grad, b1, b2, eps, lr_scale_reference_batch, warmup_start_factor, frozen_regex,
      ust_regex).
    params: parameter tree; only its structure, shapes and paths are used.
    total_steps: length of the schedule.
    global_batch_size: for the linear lr scaling.

  Returns:
    (tx, lr_schedule). `tx.update` must be called with `params`.
  """
  c = optim_config
  labels = param_labels(params, c.frozen_regex, c.ust_regex)
  wd_mask = decay_mask(params)
  peak_lr, min_lr = scaled_lrs(c, global_batch_size)
  schedule = warmup_cosine_schedule(
    peak_lr, min_lr, c.warmup_steps, total_steps, c.get("warmup_start_factor", 1e-4)
  )
  ust_steps = int(c.get("ust_steps", 0))

  def adamw_direction():
    # AdamW without the rate: lr * (adam + wd * p) is applied by the final schedule transform,
    # which is torch's decoupled decay p -= lr * wd * p followed by p -= lr * adam.
    return optax.chain(
      optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps),
      optax.add_decayed_weights(c.weight_decay, mask=wd_mask)
      if c.weight_decay
      else optax.identity(),
    )

  gate = {
    FROZEN: optax.set_to_zero(),
    TRAINABLE: optax.identity(),
    UST: _zero_until(ust_steps) if ust_steps > 0 else optax.identity(),
  }
  direction = {
    FROZEN: optax.set_to_zero(),
    TRAINABLE: adamw_direction(),
    UST: (
      optax.transforms.conditionally_mask(adamw_direction(), lambda step: step >= ust_steps)
      if ust_steps > 0
      else adamw_direction()
    ),
  }
  # Build only the groups that occur (e.g. a model with no UST group).
  used = set(jax.tree.leaves(labels))
  gate = {k: v for k, v in gate.items() if k in used}
  direction = {k: v for k, v in direction.items() if k in used}

  parts = [optax.partition(gate, labels)]
  # torch's clip_grad_norm_ scales by max / (norm + 1e-6) and optax by max / norm: a relative
  # difference of 1e-6 / norm, far below float32 noise at any norm that clipping binds on.
  if c.clip_grad:
    parts.append(optax.clip_by_global_norm(c.clip_grad))
  parts += [optax.partition(direction, labels), optax.scale_by_learning_rate(schedule)]
  return optax.chain(*parts), schedule


def trainable_grad_norm(grads, labels, step, ust_steps: int) -> jax.Array:
  """Global norm over the gradients the original would clip at `step` (torch's clip return).

  Frozen leaves are left out; UST leaves only count once `step >= ust_steps`.
  """
  sq = []
  for g, l in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)):
    if l == FROZEN:
      continue
    s = jnp.sum(jnp.square(g.astype(jnp.float32)))
    if l == UST and ust_steps > 0:
      s = jnp.where(step >= ust_steps, s, 0.0)
    sq.append(s)
  return jnp.sqrt(sum(sq)) if sq else jnp.zeros([], jnp.float32)


def count_params(params, labels) -> Mapping[str, int]:
  """Number of scalars per label (for the startup log)."""
  out = {}
  for x, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
    out[l] = out.get(l, 0) + math.prod(x.shape)
  return out
