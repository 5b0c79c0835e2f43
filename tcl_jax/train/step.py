"""The training step: the state and one optimizer update, pure and module-level.

`train_step(state, batch) -> (state, metrics, extras)` is compiled once with explicit in/out
shardings and the state donated (`make_jit_train_step`). The per-step rng is
`fold_in(state.rng, state.step)`, so a resumed run draws the same noise as an uninterrupted one.
Needs only jax, flax and optax: the benchmarks and the parity tool's trajectory replay import it
on machines without TensorFlow or clu.
"""

import functools
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp

from tcl_jax import sharding
from tcl_jax.kinds import base
from tcl_jax.train import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # typed key; per-step keys are fold_in(rng, step)


def create_train_state(params, rng, tx) -> TrainState:
  return TrainState(
    step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params), rng=rng
  )


def train_step(
  state: TrainState,
  batch,
  *,
  loss_fn,
  tx,
  labels,
  schedule,
  ust_steps: int,
  nan_at_step: int = -1,
  num_extras: int = 0,
):
  """One optimizer step on a global batch.

  Returns:
    (new_state, metrics, extras): metrics are replicated scalars (loss, each term, grad_norm, lr);
    extras hold the first `num_extras` soft positive masks for image logging.
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def objective(params):
    loss, aux = loss_fn(params, batch, rng)
    if nan_at_step >= 0:  # debug knob: poison this step's loss (and so its gradients)
      loss = loss * jnp.where(state.step == nan_at_step, jnp.nan, 1.0)
    return loss, aux

  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # Frozen leaves keep their value exactly (their update is zero anyway; this skips the add).
  params = jax.tree.map(
    lambda p, u, l: p if l == optim.FROZEN else (p + u).astype(p.dtype),
    state.params,
    updates,
    labels,
  )
  metrics = {
    "loss": loss,
    "lr": schedule(state.step),
    "grad_norm": optim.trainable_grad_norm(grads, labels, state.step, ust_steps),
  }
  # Every scalar the model reports is logged (TCL: its loss terms; CLIP: loss and accuracy).
  metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
  extras = {}
  if num_extras and "soft_pos_mask" in aux:
    extras["soft_pos_mask"] = aux["soft_pos_mask"][:num_extras]
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics, extras


def make_jit_train_step(
  *, model: base.Model, tx, labels, schedule, config, state_sharding, batch_sharding, repl
):
  """`jax.jit(train_step)` with explicit shardings and the state donated."""
  step_fn = functools.partial(
    train_step,
    loss_fn=model.loss,
    tx=tx,
    labels=labels,
    schedule=schedule,
    ust_steps=int(config.optim.get("ust_steps", 0)),
    nan_at_step=int(config.get("debug_nan_at_step", -1)),
    num_extras=int(config.get("image_log_num", 0)) if config.get("image_log_every_steps") else 0,
  )
  return jax.jit(
    step_fn,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, repl, repl),
    donate_argnums=(0,),
  )


def init_rngs(config):
  """(init_rng, state_rng): the parameter init key and the train state's key, from config.seed."""
  return jax.random.split(jax.random.key(config.seed))


class Plan(NamedTuple):
  """A run's model, optimizer and shardings, from shapes only (nothing is allocated)."""

  model: base.Model
  tx: Any
  schedule: Any
  labels: Any  # optim.param_labels of the params
  abstract_params: Any
  abstract_state: TrainState
  state_sharding: Any
  state_rng: jax.Array


def plan_training(config, model: base.Model, mesh) -> Plan:
  """The optimizer recipe of `config.optim` over the model's parameter shapes, the train state's
  shapes and shardings (what train_and_evaluate, the benchmarks and the trajectory replay run)."""
  init_rng, state_rng = init_rngs(config)
  abstract_params = jax.eval_shape(model.init, init_rng)
  tx, schedule = optim.make_optimizer(
    config.optim,
    abstract_params,
    total_steps=config.total_steps,
    global_batch_size=config.batch_size,
  )
  labels = optim.param_labels(abstract_params, config.optim.frozen_regex, config.optim.ust_regex)
  abstract_state = jax.eval_shape(
    functools.partial(create_train_state, tx=tx), abstract_params, state_rng
  )
  state_sharding = sharding.state_shardings(mesh, abstract_state, config.mesh)
  return Plan(
    model, tx, schedule, labels, abstract_params, abstract_state, state_sharding, state_rng
  )
