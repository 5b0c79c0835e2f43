"""TCL training loop: `train_and_evaluate(config, workdir)`.

Setup follows big_vision's order: logging -> mesh -> input pipeline (started early) -> model and
optimizer shapes (`jax.eval_shape`) -> shardings -> resume / init-from-checkpoint / random init
(`jax.jit(..., out_shardings=...)`, so full parameters are never built on one host) -> the jitted
`train_step` -> the loop with periodic log / image / eval / checkpoint actions.

`train_step(state, batch) -> (state, metrics, extras)` is pure and module-level; it is compiled once
with explicit in/out shardings and the state donated. The per-step rng is
`fold_in(state.rng, state.step)`, so a resumed run draws the same noise as an uninterrupted one.
"""

import contextlib
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax import checkpointing
from tcl_jax import optim
from tcl_jax import sharding

# Loss terms logged under train/<name> (the weighted terms of the original's forward).
BATCH_KEYS = ("image", "text_tokens")  # what train_step reads from a batch
LOSS_TERMS = ("area_loss", "neg_area_loss", "tclf_loss", "tv_img_loss", "tv_mask_loss",
              "tcli_loss")
# Logged too when a model reports them (the CLIP kind: tcl_jax.models.clip_contrastive).
EXTRA_TERMS = ("clip_loss", "i2t_accuracy")


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # typed key; per-step keys are fold_in(rng, step)


class Model(NamedTuple):
  """What the loop needs from a model."""
  cfg: Any  # model config (TCLConfig), passed to evaluation
  init: Callable[[jax.Array], Any]  # rng -> params
  # (params, batch, rng) -> (loss, aux); aux holds LOSS_TERMS and optionally "soft_pos_mask"
  loss: Callable[..., tuple[jax.Array, dict]]
  load: Callable[[str], Any] | None = None  # path -> params (init_checkpoint)


# ------------------------------------------------------------------------------------------------
# Pieces (importable by tests)
# ------------------------------------------------------------------------------------------------

def resolve_compute_dtype(name: str):
  """'auto' = bfloat16 on accelerators, float32 on CPU."""
  if name == "auto":
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return jnp.dtype(name)


def build_model(config) -> Model:
  """The TCL model from `config.model` (TCLConfig fields); with `config.model_kind = "clip"`, a
  CLIP trained contrastively from `config.model.clip` (tcl_jax.models.clip_contrastive)."""
  if config.get("model_kind", "tcl") == "clip":
    return _build_clip_model(config)
  from tcl_jax.models import tcl as tcl_lib  # pylint: disable=g-import-not-at-top
  cfg = tcl_lib.TCLConfig.from_dict(config.model.to_dict())
  dtype = resolve_compute_dtype(config.get("compute_dtype", "auto"))
  remat = bool(config.get("remat", False))

  def loss(params, batch, rng):
    # An optional "gumbel_uniform" batch entry replays given Gumbel noise instead of drawing it
    # from the step rng: only the parity tool's trajectory replay uses it, never training.
    uniform = batch.get("gumbel_uniform")
    return tcl_lib.tcl_loss(params, cfg, batch["image"], batch["text_tokens"],
                            rng=None if uniform is not None else rng, uniform=uniform,
                            compute_dtype=dtype, remat=remat)

  def load(path):
    from tcl_jax import convert  # pylint: disable=g-import-not-at-top
    # Attention heads cannot be read off tensor shapes, and a CLIP-only file has no masker:
    # the config says what the model is; conversion fails loudly if the file disagrees.
    overrides = {k: v for k, v in cfg.to_dict().items() if k != "clip"}
    ckpt_cfg, params = convert.load_any(
        path, vision_heads=cfg.clip.vision_heads, text_heads=cfg.clip.transformer_heads,
        seed=int(config.seed), **overrides)
    if ckpt_cfg.clip != cfg.clip or ckpt_cfg.ie_freeze != cfg.ie_freeze:
      raise ValueError(
          f"init_checkpoint {path} holds a model with clip={ckpt_cfg.clip}, ie_freeze="
          f"{ckpt_cfg.ie_freeze}, but config.model has clip={cfg.clip}, ie_freeze="
          f"{cfg.ie_freeze}; set config.model to match the checkpoint")
    return params

  return Model(cfg=cfg, init=lambda rng: tcl_lib.init_params(cfg, rng), loss=loss, load=load)


def _build_clip_model(config) -> Model:
  from tcl_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from tcl_jax.models import clip_contrastive  # pylint: disable=g-import-not-at-top
  cfg = clip_lib.CLIPConfig(**config.model.clip.to_dict())
  dtype = resolve_compute_dtype(config.get("compute_dtype", "auto"))

  def loss(params, batch, rng):
    del rng  # deterministic objective
    return clip_contrastive.contrastive_loss(params, cfg, batch["image"], batch["text_tokens"],
                                             dtype)

  return Model(cfg=cfg, init=lambda rng: clip_contrastive.init_params(cfg, rng), loss=loss)


def create_train_state(params, rng, tx) -> TrainState:
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng)


def train_step(state: TrainState, batch, *, loss_fn, tx, labels, schedule, ust_steps: int,
               nan_at_step: int = -1, num_extras: int = 0):
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
  params = jax.tree.map(lambda p, u, l: p if l == optim.FROZEN else (p + u).astype(p.dtype),
                        state.params, updates, labels)
  metrics = {"loss": loss, "lr": schedule(state.step),
             "grad_norm": optim.trainable_grad_norm(grads, labels, state.step, ust_steps)}
  metrics.update({k: aux[k] for k in LOSS_TERMS + EXTRA_TERMS if k in aux})
  extras = {}
  if num_extras and "soft_pos_mask" in aux:
    extras["soft_pos_mask"] = aux["soft_pos_mask"][:num_extras]
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics, extras


def make_jit_train_step(*, model: Model, tx, labels, schedule, config, state_sharding,
                        batch_sharding, repl):
  """`jax.jit(train_step)` with explicit shardings and the state donated."""
  step_fn = functools.partial(
      train_step, loss_fn=model.loss, tx=tx, labels=labels, schedule=schedule,
      ust_steps=int(config.optim.get("ust_steps", 0)),
      nan_at_step=int(config.get("debug_nan_at_step", -1)),
      num_extras=int(config.get("image_log_num", 0)) if config.get("image_log_every_steps") else 0)
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, repl, repl), donate_argnums=(0,))


def mask_overlay_grid(images, masks, mean, std, threshold: float | None = None) -> np.ndarray:
  """[3*H, n*W, 3] uint8 grid: images; soft positive masks; image * mask.

  The original's wandb grid thresholds the masks at 0.5 (`threshold=0.5`); the default shows the
  soft values, which stay informative early in training when few pixels pass 0.5.
  """
  images = np.clip(np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean), 0, 1)
  n, h, w, _ = images.shape
  masks = np.asarray(masks, np.float32)
  # Nearest upsampling of the [n, h', w'] masks to the image size.
  ys = (np.arange(h) * masks.shape[1]) // h
  xs = (np.arange(w) * masks.shape[2]) // w
  m = masks[:, ys][:, :, xs]
  if threshold is not None:
    m = (m > threshold).astype(np.float32)
  m = np.clip(m, 0, 1)[..., None].repeat(3, -1)
  rows = [images, m, images * m]
  grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
  return (grid * 255).round().astype(np.uint8)


class _Preemption:
  """Records SIGTERM so the loop can checkpoint and exit between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    # Multi-process: JAX's preemption service (started by jax.distributed.initialize) owns
    # SIGTERM; a Python handler here would replace its notifier.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: will checkpoint and stop after this step.", signum)
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # All hosts must agree on the step; JAX's preemption service (active after
      # jax.distributed.initialize) delivers the notice to every process at the same step.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested


def _next_batch(train_iter, preemption: _Preemption):
  """`next(train_iter)`, or None if a preemption notice arrives while waiting for it.

  The read runs in a daemon thread: Python runs a signal handler only when the main thread runs
  bytecode, never while it is blocked inside tf.data's C++ reads (a stalled file system), so a
  SIGTERM would otherwise wait for data that may never come. An abandoned read stays blocked in
  its thread until the process exits.
  """
  done, out = threading.Event(), []

  def read():
    try:
      out.append((next(train_iter), None))
    except BaseException as e:  # pylint: disable=broad-except
      out.append((None, e))
    done.set()

  threading.Thread(target=read, name="next_batch", daemon=True).start()
  t0, report_at = time.time(), 10.0
  while not done.wait(0.2):
    if preemption.requested:
      return None
    if time.time() - t0 >= report_at:
      logging.info("Waiting for input data (%.0f s so far)", time.time() - t0)
      report_at *= 2
  batch, error = out[0]
  if error is not None:
    raise error
  return batch


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  host = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def _peak_memory_metrics() -> dict[str, float]:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if not stats or "peak_bytes_in_use" not in stats:
    return {}
  return {"peak_memory_gib": stats["peak_bytes_in_use"] / 2**30}


# ------------------------------------------------------------------------------------------------
# Data and evaluation hooks
# ------------------------------------------------------------------------------------------------

def prepare_synthetic_data(config, workdir: str) -> None:
  """Writes the synthetic train/eval sets into the workdir once (configs/synthetic.py)."""
  syn = config.get("synthetic")
  if not syn:
    return
  root = os.path.join(workdir, "data")
  done = os.path.join(root, "DONE")
  if jax.process_index() == 0 and not os.path.exists(done):
    from tcl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    from tcl_jax import seg_data  # pylint: disable=g-import-not-at-top
    logging.info("Writing synthetic data under %s", root)
    synthetic.write_synthetic_image_text(
        os.path.join(root, "train"), num_examples=syn.num_train_examples,
        image_size=syn.image_size, num_shards=syn.num_shards, seed=syn.seed)
    for task in [t.strip() for t in config.evals.tasks.split(",") if t.strip()]:
      seg_data.write_synthetic_segmentation(_expand(config.evals.data_root, workdir), task,
                                            num_images=syn.num_eval_images, seed=syn.seed)
    with open(done, "w") as f:
      f.write("ok\n")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("synthetic data written")


def _expand(path: str, workdir: str) -> str:
  return path.format(workdir=workdir)


def make_train_iterator(config, workdir: str):
  """The input pipeline's iterator: this host's share of each global batch (in-memory batches
  with `config.input.in_memory`)."""
  inp = config.input
  if inp.get("in_memory"):
    from tcl_jax.data import in_memory  # pylint: disable=g-import-not-at-top
    return in_memory.InMemoryIterator(
        global_batch_size=config.batch_size, image_size=inp.image_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        context_length=config.model.clip.context_length)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tcl_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from tcl_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  patterns = [_expand(p, workdir) for p in inp.train_files]
  for p in patterns:  # a wrong path is the likeliest mistake: name it before reading anything
    if not any(tf.io.gfile.exists(f) for f in input_pipeline.list_files(p)):
      where = "" if "://" in p or os.path.isabs(p) else f" (relative to {os.getcwd()})"
      raise ValueError(f"config.input.train_files: no file matches {p!r}{where}")
  import ml_collections  # pylint: disable=g-import-not-at-top
  kwargs = inp.get("options", ml_collections.ConfigDict()).to_dict()
  if inp.get("augment") is not None:  # AugmentConfig fields over the original's defaults
    kwargs["augment"] = augment_lib.AugmentConfig(image_size=inp.image_size,
                                                  **inp.augment.to_dict())
  return input_pipeline.make_train_iterator(
      patterns, global_batch_size=config.batch_size, image_size=inp.image_size,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      **kwargs)


def run_evaluation(params, model: Model, config, workdir: str) -> dict | None:
  """`evaluate.evaluate_tasks` on `config.evals`; None when no tasks are configured."""
  evals = config.get("evals")
  if not evals or not evals.get("tasks"):
    return None
  from tcl_jax import evaluate  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  eval_config = ml_collections.ConfigDict(evals.to_dict())
  if "data_root" in eval_config:
    eval_config.data_root = _expand(eval_config.data_root, workdir)
  return evaluate.evaluate_tasks(params, model.cfg, eval_config, progress=False)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def train_and_evaluate(config: "ml_collections.ConfigDict", workdir: str, *,
                       model: Model | None = None, train_iter=None, devices=None
                       ) -> tuple[TrainState, list[dict]]:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Args:
    config: see configs/tcl.py.
    workdir: checkpoints, TensorBoard events and config.json go here.
    model: overrides `build_model(config)` (tests use toy models).
    train_iter: overrides the input pipeline (an iterator with get_state/set_state/counters).
    devices: the devices of the mesh (default: all).

  Returns:
    (final state, logged metrics history: one host dict per log step, with its "step").

  Raises:
    NonFiniteLossError: the loss or a gradient became NaN/inf (no checkpoint is written after
      the last finite step).
  """
  t_enter = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  resume_step = check_resume(config, workdir)  # before config.json is rewritten
  idle = resume_step is not None and resume_step >= config.total_steps
  if idle:
    logging.info("%s is at step %d of total_steps=%d: nothing to train", workdir, resume_step,
                 config.total_steps)

  # ---------------------------------------------------------------- logging
  # clu and ml_collections are imported where used: tcl_jax.bench imports this module for
  # train_step on machines that have only jax, flax, optax and numpy.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  is_chief = jax.process_index() == 0
  # A run with nothing to train writes neither an (empty) TensorBoard events file nor a
  # config.json that would no longer describe the checkpoints.
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief or idle)
  if is_chief and not idle:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh, devices)
  batch_sharding = sharding.data_sharding(mesh)
  repl = sharding.repl_sharding(mesh)
  logging.info("mesh %s", dict(zip(mesh.axis_names, mesh.devices.shape)))
  if config.batch_size % mesh.devices.size:
    raise ValueError(f"batch_size {config.batch_size} must divide over {mesh.devices.size} devices")
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} must divide over {jax.process_count()} hosts")

  # ---------------------------------------------------------------- input pipeline
  prepare_synthetic_data(config, workdir)
  if train_iter is None:
    train_iter = make_train_iterator(config, workdir)

  # ---------------------------------------------------------------- model and optimizer shapes
  if model is None:
    model = build_model(config)
  rng = jax.random.key(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  abstract_params = jax.eval_shape(model.init, init_rng)
  tx, schedule = optim.make_optimizer(config.optim, abstract_params,
                                      total_steps=config.total_steps,
                                      global_batch_size=config.batch_size)
  labels = optim.param_labels(abstract_params, config.optim.frozen_regex, config.optim.ust_regex)
  counts = optim.count_params(abstract_params, labels)
  logging.info("parameters by group: %s", counts)
  peak_lr, min_lr = optim.scaled_lrs(config.optim, config.batch_size)
  logging.info("lr: peak %.3g, min %.3g (base %.3g, min %.3g, global batch %d)", peak_lr,
               min_lr, config.optim.base_lr, config.optim.min_lr, config.batch_size)
  abstract_state = jax.eval_shape(
      functools.partial(create_train_state, tx=tx), abstract_params, state_rng)

  # ---------------------------------------------------------------- shardings
  state_sharding = sharding.state_shardings(mesh, abstract_state, config.mesh)
  params_sharding = state_sharding.params

  with jax.set_mesh(mesh):
    # -------------------------------------------------------------- resume / init
    mngr = checkpointing.create_checkpoint_manager(workdir, config.checkpoint)
    latest = mngr.latest_step()
    jit_create = jax.jit(functools.partial(create_train_state, tx=tx),
                         in_shardings=(params_sharding, repl), out_shardings=state_sharding)
    if latest is not None:
      logging.info("Resuming from %s step %d", mngr.directory, latest)
      target = checkpointing.abstract_with_shardings(abstract_state, state_sharding)
      state, input_states = checkpointing.restore(mngr, latest, target)
      local_input_state = checkpointing.local_input_state(input_states)
      if local_input_state and hasattr(train_iter, "set_state"):
        train_iter.set_state(local_input_state)
    else:
      if config.get("init_checkpoint"):
        path = _expand(config.init_checkpoint, workdir)
        logging.info("Initialising parameters from %s", path)
        params = model.load(path)
        params = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), params, abstract_params)
        params = jax.device_put(params, params_sharding)
      else:
        params = jax.jit(model.init, out_shardings=params_sharding)(init_rng)
      state = jit_create(params, state_rng)
    first_step = int(jax.device_get(state.step))

    # -------------------------------------------------------------- train step
    jit_step = make_jit_train_step(model=model, tx=tx, labels=labels, schedule=schedule,
                                   config=config, state_sharding=state_sharding,
                                   batch_sharding=batch_sharding, repl=repl)

    # -------------------------------------------------------------- loop
    total = int(config.total_steps)
    hooks = []
    report = None
    if is_chief:
      report = periodic_actions.ReportProgress(
          num_train_steps=total, writer=writer, every_steps=config.log_every_steps,
          every_secs=None)
      hooks.append(report)
    image_every = int(config.get("image_log_every_steps", 0))
    mean = np.asarray(config.input.get("image_mean", (0.485, 0.456, 0.406)), np.float32)
    std = np.asarray(config.input.get("image_std", (0.229, 0.224, 0.225)), np.float32)

    def every(n, s):
      return n and s % n == 0

    def input_state_now():
      local = train_iter.get_state() if hasattr(train_iter, "get_state") else {}
      return checkpointing.gather_input_states(local)

    def check_finite(step_count, metrics):
      m = jax.device_get(metrics)
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        mngr.wait_until_finished()
        msg = (f"Non-finite loss/gradient at step {step_count} (loss={m['loss']}, grad_norm="
               f"{m['grad_norm']}). Stopping; the last good checkpoint is step "
               f"{mngr.latest_step()} in {mngr.directory}.")
        logging.error(msg)
        writer.flush()
        raise NonFiniteLossError(msg)

    history, pending, logged, saved = [], [], [], []
    prev_metrics = None
    step = first_step
    compiled = None
    t_start = time.time()
    preempted = False
    try:
      with _Preemption() as preemption:
        while step < total:
          before = train_iter.get_state() if hasattr(train_iter, "get_state") else {}
          host_batch = _next_batch(train_iter, preemption)
          if host_batch is None:  # SIGTERM while waiting for data: keep the steps done so far
            if step > first_step:
              check_finite(step, prev_metrics)
              checkpointing.save(mngr, step, state, checkpointing.gather_input_states(before))
            logging.warning("Preempted while waiting for input data: stopped at step %d.", step)
            preempted = True
            break
          batch = sharding.to_global({k: host_batch[k] for k in BATCH_KEYS}, batch_sharding)
          if compiled is None:
            t0 = time.time()
            compiled = jit_step.lower(state, batch).compile()
            logging.info("train_step compiled in %.1fs", time.time() - t0)
          with jax.transfer_guard("disallow"):
            state, metrics, extras = compiled(state, batch)
          step += 1
          if step == first_step + 1:
            jax.block_until_ready(metrics)
            t_first = time.time() - t_start
            logging.info("first step done %.1fs after the loop started (incl. compile), %.1fs "
                         "after train_and_evaluate started", t_first, time.time() - t_enter)
            writer.write_scalars(step, {"perf/time_to_first_step_s": t_first})
          # Lagged finiteness check: while step k runs, look at step k-1 (keeps dispatch ahead).
          if prev_metrics is not None and config.get("check_finite_every_step", True):
            check_finite(step - 1, prev_metrics)
          prev_metrics = metrics
          pending.append(metrics)
          for h in hooks:
            h(step)

          if every(config.log_every_steps, step) or step == total:
            check_finite(step, metrics)
            avg = _mean_metrics(pending)
            pending = []
            scalars = {f"train/{k}": v for k, v in avg.items()}
            scalars.update({f"perf/{k}": v for k, v in _peak_memory_metrics().items()})
            if hasattr(train_iter, "counters"):
              scalars.update({f"input/{k}": float(v) for k, v in train_iter.counters().items()})
            writer.write_scalars(step, scalars)
            history.append({"step": step, "loop_time_s": time.time() - t_start, **avg})

          if image_every and every(image_every, step) and "soft_pos_mask" in extras and is_chief:
            n = extras["soft_pos_mask"].shape[0]
            grid = mask_overlay_grid(np.asarray(host_batch["image"][:n]),
                                     jax.device_get(extras["soft_pos_mask"]), mean, std)
            writer.write_images(step, {"train/masks": grid[None]})

          stop = preemption.should_stop(step)  # (a sync point on multi-host: once per step)
          eval_metrics = None
          if not stop and (every(config.get("eval_every_steps", 0), step) or (
              step == total and config.get("eval_at_end", True))):
            check_finite(step, metrics)
            timed = report.timed("eval") if report else contextlib.nullcontext()
            with timed:
              results = run_evaluation(state.params, model, config, workdir)
            if results is not None:
              eval_metrics = _eval_scalars(results)
              writer.write_scalars(step, eval_metrics)
              logged.append({"step": step, **eval_metrics})

          if (every(config.checkpoint_every_steps, step) or step == total or stop
              or eval_metrics is not None):
            check_finite(step, metrics)
            best = ({"miou": eval_metrics[AVERAGE_MIOU]}
                    if eval_metrics and AVERAGE_MIOU in eval_metrics else None)
            timed = report.timed("checkpoint") if report else contextlib.nullcontext()
            with timed:
              if checkpointing.save(mngr, step, state, input_state_now(), metrics=best):
                saved.append(step)
          if stop:
            logging.warning("Preempted: checkpoint at step %d written, exiting.", step)
            preempted = True
            break
    finally:
      mngr.wait_until_finished()
      mngr.close()
      writer.flush()
    if not preempted:
      logging.info("Training done: %d steps in %.1fs", step - first_step, time.time() - t_start)
  if is_chief:
    print(format_run_summary(workdir, first_step, step, time.time() - t_enter, history, logged,
                             saved), flush=True)
  return state, history + logged


def check_resume(config, workdir: str) -> int | None:
  """The latest checkpoint step in `workdir` (None: a new run), read from the files so that it
  runs before config.json is rewritten.

  Refuses (ValueError) to extend a finished run with a larger total_steps: the cosine decay is
  laid out over total_steps, so the lr would jump back up mid-run while warmup and UST keep their
  old lengths. (Resuming an unfinished run with another total_steps is allowed: that is how a
  preempted run is shortened or lengthened on purpose.)
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  if not steps:
    return None
  latest = max(steps)
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      finished_at = json.load(f).get("total_steps")
  except (OSError, ValueError):
    finished_at = None
  if finished_at is not None and latest >= finished_at and config.total_steps > finished_at:
    raise ValueError(
        f"{workdir} holds a finished run (step {latest} of total_steps={finished_at}); "
        f"continuing it to total_steps={config.total_steps} would restart the decay of its lr "
        f"schedule mid-run. Train in a new --workdir with --config.init_checkpoint={workdir} "
        "to start from its weights")
  return latest


def format_run_summary(workdir: str, first_step: int, last_step: int, wall_s: float,
                       history: list[dict], evals: list[dict], saved: list[int]) -> str:
  """The table printed at the end of a run: steps, wall time, the last logged losses, the last
  mIoU per task (%), the checkpoints written."""
  rows = [("workdir", workdir),
          ("steps", f"{first_step} -> {last_step} ({last_step - first_step} in this run)"),
          ("wall time", f"{wall_s:.1f} s")]
  train_logs = [h for h in history if "loss" in h]
  if train_logs:
    last = train_logs[-1]
    for k in ["loss"] + sorted(k for k in last if k.endswith("_loss")):
      rows.append((f"train/{k}", f"{last[k]:.4f}  (step {last['step']})"))
  if evals:
    last = evals[-1]
    for k, v in last.items():
      if k != "step":
        rows.append((k, f"{v:.2f}  (step {last['step']})"))
  rows.append(("checkpoints written",
               ", ".join(map(str, saved)) + f"  (in {workdir}/checkpoints)" if saved else "none"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(["Run summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])


AVERAGE_MIOU = "eval/average_miou_percent"  # TensorBoard tag; also the best-checkpoint metric


def _eval_scalars(results: dict) -> dict[str, float]:
  """{"eval/<task>/miou_percent", "eval/average_miou_percent"} from evaluate_tasks' result (None
  -> skipped); the unit is in the name because TensorBoard shows nothing else."""
  out = {}
  for task, r in results.items():
    if task == "average":
      if r is not None:
        out[AVERAGE_MIOU] = float(r)
    elif isinstance(r, dict) and r.get("miou") is not None:
      out[f"eval/{task}/miou_percent"] = float(r["miou"])
  return out
