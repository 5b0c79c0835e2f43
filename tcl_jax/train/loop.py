"""TCL training loop: `train_and_evaluate(config, workdir)`.

Setup follows big_vision's order: logging -> mesh -> input pipeline (started early) -> model and
optimizer shapes (`jax.eval_shape`) -> shardings -> resume / init-from-checkpoint / random init
(`jax.jit(..., out_shardings=...)`, so full parameters are never built on one host) -> the jitted
`train_step` (tcl_jax.train.step) -> the loop with periodic log / image / eval / checkpoint
actions. Models come from the registry (tcl_jax.kinds), inputs from tcl_jax.train.inputs, stop
requests from tcl_jax.train.preemption, reports from tcl_jax.train.summaries.
"""

import contextlib
import functools
import json
import os
import time

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from tcl_jax import kinds
from tcl_jax import sharding
from tcl_jax.kinds import base
from tcl_jax.models import clip as clip_lib
from tcl_jax.train import checkpointing
from tcl_jax.train import inputs as train_inputs
from tcl_jax.train import optim
from tcl_jax.train import preemption as preemption_lib
from tcl_jax.train import step as step_lib
from tcl_jax.train import summaries
from tcl_jax.zeroshot import evaluator


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


def initial_params(
  model: base.Model, config, workdir: str, abstract_params=None, params_sharding=None
):
  """The parameters a new run starts from: `config.init_checkpoint` (its `{workdir}` expanded)
  loaded by the model kind, else the model's random init with init_rngs' key."""
  if config.get("init_checkpoint"):
    path = checkpointing.expand_workdir(config.init_checkpoint, workdir)
    logging.info("Initialising parameters from %s", path)
    # Each process reads its own copy onto its own devices (placed below); one that fails stops
    # every process at once, each with one line.
    params = sharding.in_every_process(
      lambda: model.load(path), f"loading config.init_checkpoint={config.init_checkpoint}"
    )
    if abstract_params is not None:
      params = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), params, abstract_params)
    return params if params_sharding is None else jax.device_put(params, params_sharding)
  init_rng, _ = step_lib.init_rngs(config)
  return jax.jit(model.init, out_shardings=params_sharding)(init_rng)


def run_evaluation(params, model: base.Model, config, workdir: str, mesh=None) -> dict | None:
  """Zero-shot evaluation on `config.evals` (tcl_jax.zeroshot); None when no tasks are
  configured. Raises ValueError when the model kind cannot be evaluated."""
  evals = config.get("evals")
  if not evals or not evals.get("tasks"):
    return None
  if model.zero_shot is None:
    raise ValueError("this model kind has no zero-shot segmentation; set config.evals.tasks=''")
  eval_config = ml_collections.ConfigDict(evals.to_dict())
  if "data_root" in eval_config:
    eval_config.data_root = checkpointing.expand_workdir(eval_config.data_root, workdir)
  # Each process evaluates its share of the images on its own devices of the training mesh.
  if mesh is not None:
    mesh = mesh.local_mesh if jax.process_count() > 1 else mesh
    mesh = mesh if mesh.devices.size > 1 else None
  return evaluator.evaluate_config(model.zero_shot, params, eval_config, mesh=mesh, progress=False)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def restore_or_init(plan: step_lib.Plan, config, workdir: str, mngr, train_iter, repl):
  """The latest checkpoint in `mngr` (and the input position it saved), else a new state from
  initial_params. Call under the mesh."""
  latest = mngr.latest_step()
  if latest is not None:
    logging.info("Resuming from %s step %d", mngr.directory, latest)
    target = checkpointing.abstract_with_shardings(plan.abstract_state, plan.state_sharding)
    state, input_states = checkpointing.restore(mngr, latest, target)
    local_input_state = checkpointing.local_input_state(input_states)
    if local_input_state and hasattr(train_iter, "set_state"):
      train_iter.set_state(local_input_state)
    return state
  params_sharding = plan.state_sharding.params
  jit_create = jax.jit(
    functools.partial(step_lib.create_train_state, tx=plan.tx),
    in_shardings=(params_sharding, repl),
    out_shardings=plan.state_sharding,
  )
  params = initial_params(plan.model, config, workdir, plan.abstract_params, params_sharding)
  return jit_create(params, plan.state_rng)


def _every(n, s):
  return n and s % n == 0


class _Loop:
  """The training loop's periodic actions (log, images, eval, checkpoint) around the step."""

  def __init__(self, config, workdir, model, train_iter, mngr, writer, mesh, t_enter):
    self.config, self.workdir, self.model, self.train_iter = config, workdir, model, train_iter
    self.mngr, self.writer, self.mesh, self.t_enter = mngr, writer, mesh, t_enter
    self.is_chief = jax.process_index() == 0
    self.report = None
    if self.is_chief:
      self.report = periodic_actions.ReportProgress(
        num_train_steps=int(config.total_steps),
        writer=writer,
        every_steps=config.log_every_steps,
        every_secs=None,
      )
    self.history, self.pending, self.logged, self.saved = [], [], [], []
    self.t_start = time.time()

  def timed(self, name):
    return self.report.timed(name) if self.report else contextlib.nullcontext()

  def input_state_now(self):
    local = self.train_iter.get_state() if hasattr(self.train_iter, "get_state") else {}
    return checkpointing.gather_input_states(local)

  def check_finite(self, step_count, metrics):
    m = jax.device_get(metrics)
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      self.mngr.wait_until_finished()
      msg = (
        f"Non-finite loss/gradient at step {step_count} (loss={m['loss']}, grad_norm="
        f"{m['grad_norm']}). Stopping; the last good checkpoint is step "
        f"{self.mngr.latest_step()} in {self.mngr.directory}."
      )
      logging.error(msg)
      self.writer.flush()
      raise NonFiniteLossError(msg)

  def log(self, step, metrics):
    self.check_finite(step, metrics)
    avg = summaries.mean_metrics(self.pending)
    self.pending = []
    scalars = {f"train/{k}": v for k, v in avg.items()}
    scalars.update({f"perf/{k}": v for k, v in summaries.peak_memory_metrics().items()})
    if hasattr(self.train_iter, "counters"):
      scalars.update({f"input/{k}": float(v) for k, v in self.train_iter.counters().items()})
    self.writer.write_scalars(step, scalars)
    self.history.append({"step": step, "loop_time_s": time.time() - self.t_start, **avg})

  def images(self, step, host_batch, extras):
    n = extras["soft_pos_mask"].shape[0]
    mean = np.asarray(clip_lib.IMAGE_MEAN, np.float32)  # what the input pipeline normalised with
    std = np.asarray(clip_lib.IMAGE_STD, np.float32)
    grid = summaries.mask_overlay_grid(
      np.asarray(host_batch["image"][:n]), jax.device_get(extras["soft_pos_mask"]), mean, std
    )
    self.writer.write_images(step, {"train/masks": grid[None]})

  def evaluate(self, step, state, metrics):
    """Runs after the step's checkpoint: an evaluation that fails is one logged line, and
    training goes on (one that is killed loses no training)."""
    self.check_finite(step, metrics)
    self.mngr.wait_until_finished()  # the step's checkpoint is on disk before the evaluation
    try:
      with self.timed("eval"):
        results = run_evaluation(state.params, self.model, self.config, self.workdir, self.mesh)
    except Exception as e:  # pylint: disable=broad-except
      logging.debug("evaluation traceback", exc_info=True)
      logging.error("Evaluation at step %d failed, training goes on: %s", step, e)
      return
    if results is None:
      return
    eval_metrics = summaries.eval_scalars(results)
    self.writer.write_scalars(step, eval_metrics)
    self.logged.append({"step": step, **eval_metrics})
    if summaries.AVERAGE_MIOU in eval_metrics:  # ranks this step's checkpoint for keep_best
      checkpointing.record_eval(self.mngr, step, eval_metrics[summaries.AVERAGE_MIOU])

  def checkpoint(self, step, state, metrics):
    self.check_finite(step, metrics)
    with self.timed("checkpoint"):
      if checkpointing.save(self.mngr, step, state, self.input_state_now()):
        self.saved.append(step)

  def run(self, state, jit_step, batch_sharding, preemption):
    """Steps until total_steps or a stop request; returns (state, step, preempted)."""
    config, train_iter = self.config, self.train_iter
    total = int(config.total_steps)
    image_every = int(config.get("image_log_every_steps", 0))
    first_step = step = int(jax.device_get(state.step))
    prev_metrics, compiled = None, None
    while step < total:
      before = train_iter.get_state() if hasattr(train_iter, "get_state") else {}
      host_batch = preemption_lib.next_batch(train_iter, preemption)
      if host_batch is None:  # SIGTERM while waiting for data: keep the steps done so far
        if step > first_step:
          self.check_finite(step, prev_metrics)
          checkpointing.save(self.mngr, step, state, checkpointing.gather_input_states(before))
        logging.warning("Preempted while waiting for input data: stopped at step %d.", step)
        return state, step, True
      batch = sharding.to_global({k: host_batch[k] for k in self.model.batch_keys}, batch_sharding)
      if compiled is None:
        t0 = time.time()
        compiled = jit_step.lower(state, batch).compile()
        logging.info("train_step compiled in %.1fs", time.time() - t0)
        sharding.wait_for_all_processes(f"train_step compiled at step {step}")
      with jax.transfer_guard("disallow"):
        state, metrics, extras = compiled(state, batch)
      step += 1
      if step == first_step + 1:
        jax.block_until_ready(metrics)
        t_first = time.time() - self.t_start
        logging.info(
          "first step done %.1fs after the loop started (incl. compile), %.1fs "
          "after train_and_evaluate started",
          t_first,
          time.time() - self.t_enter,
        )
        self.writer.write_scalars(step, {"perf/time_to_first_step_s": t_first})
      # Lagged finiteness check: while step k runs, look at step k-1 (keeps dispatch ahead).
      if prev_metrics is not None and config.get("check_finite_every_step", True):
        self.check_finite(step - 1, prev_metrics)
      prev_metrics = metrics
      self.pending.append(metrics)
      if self.report is not None:
        self.report(step)
      if _every(config.log_every_steps, step) or step == total:
        self.log(step, metrics)
      if image_every and _every(image_every, step) and "soft_pos_mask" in extras and self.is_chief:
        self.images(step, host_batch, extras)
      stop = preemption.should_stop(step)  # (a sync point on multi-host: once per step)
      eval_due = not stop and (
        _every(config.get("eval_every_steps", 0), step)
        or (step == total and config.get("eval_at_end", True))
      )
      # An evaluated step is saved first: the checkpoint that keep_best may keep, and no
      # training lost to an evaluation that fails or is killed.
      if _every(config.checkpoint_every_steps, step) or step == total or stop or eval_due:
        self.checkpoint(step, state, metrics)
      if eval_due:
        self.evaluate(step, state, metrics)
      if stop:
        logging.warning("Preempted: checkpoint at step %d written, exiting.", step)
        return state, step, True
    return state, step, False


def _open_run_logs(config, workdir: str, idle: bool):
  """The metric writer, and config.json on process 0. A run with nothing to train writes neither
  an (empty) TensorBoard events file nor a config.json that would no longer describe the
  checkpoints."""
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief or idle)
  if is_chief and not idle:
    with open(checkpointing.config_path(workdir), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  logging.info(
    "process %d/%d, %d local / %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )
  return writer


def train_and_evaluate(
  config: "ml_collections.ConfigDict",
  workdir: str,
  *,
  model: base.Model | None = None,
  train_iter=None,
  devices=None,
) -> tuple[step_lib.TrainState, list[dict]]:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Args:
    config: see configs/tcl.py.
    workdir: checkpoints, TensorBoard events and config.json go here.
    model: overrides `kinds.build_model(config)` (tests use toy models).
    train_iter: overrides the input pipeline (an iterator with get_state/set_state/counters).
    devices: the devices of the mesh (default: all).

  Returns:
    (final state, logged metrics history: one host dict per log step, with its "step").

  Raises:
    NonFiniteLossError: the loss or a gradient became NaN/inf (no checkpoint is written after
      the last finite step).
    preemption.Interrupted: Ctrl-C stopped the run (after its checkpoint was written).
  """
  t_enter = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  resume_step = check_resume(config, workdir)  # before config.json is rewritten
  idle = resume_step is not None and resume_step >= config.total_steps
  if idle:
    logging.info(
      "%s is at step %d of total_steps=%d: nothing to train",
      workdir,
      resume_step,
      config.total_steps,
    )

  # ---------------------------------------------------------------- logging
  writer = _open_run_logs(config, workdir, idle)

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh, devices)
  logging.info("mesh %s", dict(zip(mesh.axis_names, mesh.devices.shape)))
  if config.batch_size % mesh.devices.size:
    raise ValueError(f"batch_size {config.batch_size} must divide over {mesh.devices.size} devices")
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} must divide over {jax.process_count()} hosts")

  # ---------------------------------------------------------------- input pipeline
  train_inputs.prepare_synthetic_data(config, workdir)
  own_iter = train_iter is None
  if own_iter:
    train_iter = train_inputs.make_train_iterator(config, workdir)
  try:
    return _train(config, workdir, model, train_iter, mesh, writer, t_enter)
  finally:
    if own_iter:  # its threads stopped while Python can serve them: a clean exit
      preemption_lib.close_input(train_iter)
    writer.close()


def _train(config, workdir, model, train_iter, mesh, writer, t_enter):
  """train_and_evaluate from the model on, with its input pipeline and writer open."""
  batch_sharding = sharding.data_sharding(mesh)
  repl = sharding.repl_sharding(mesh)
  is_chief = jax.process_index() == 0

  # ---------------------------------------------------------------- model, optimizer, shardings
  if model is None:
    model = kinds.build_model(config)
  if config.get("evals") and config.evals.get("tasks") and model.zero_shot is None:
    raise ValueError("this model kind has no zero-shot segmentation: set --config.evals.tasks=''")
  plan = step_lib.plan_training(config, model, mesh)
  logging.info("parameters by group: %s", optim.count_params(plan.abstract_params, plan.labels))
  peak_lr, min_lr = optim.scaled_lrs(config.optim, config.batch_size)
  logging.info(
    "lr: peak %.3g, min %.3g (base %.3g, min %.3g, global batch %d)",
    peak_lr,
    min_lr,
    config.optim.base_lr,
    config.optim.min_lr,
    config.batch_size,
  )

  with jax.set_mesh(mesh):
    # -------------------------------------------------------------- resume / init
    mngr = checkpointing.create_checkpoint_manager(workdir, config.checkpoint)
    state = restore_or_init(plan, config, workdir, mngr, train_iter, repl)
    first_step = int(jax.device_get(state.step))

    # -------------------------------------------------------------- train step and loop
    jit_step = step_lib.make_jit_train_step(
      model=model,
      tx=plan.tx,
      labels=plan.labels,
      schedule=plan.schedule,
      config=config,
      state_sharding=plan.state_sharding,
      batch_sharding=batch_sharding,
      repl=repl,
    )
    loop = _Loop(config, workdir, model, train_iter, mngr, writer, mesh, t_enter)
    try:
      with preemption_lib.Preemption() as preemption:
        state, step, preempted = loop.run(state, jit_step, batch_sharding, preemption)
    finally:
      mngr.wait_until_finished()
      mngr.close()
    if not preempted:
      logging.info(
        "Training done: %d steps in %.1fs", step - first_step, time.time() - loop.t_start
      )
  if is_chief:
    print(
      summaries.format_run_summary(
        workdir, first_step, step, time.time() - t_enter, loop.history, loop.logged, loop.saved
      ),
      flush=True,
    )
  if preempted and preemption.interrupted:  # Ctrl-C: saved; the caller says so and exits
    raise preemption_lib.Interrupted(step, checkpointing.checkpoints_dir(workdir))
  return state, loop.history + loop.logged


def check_resume(config, workdir: str) -> int | None:
  """The latest checkpoint step in `workdir` (None: a new run), read from the files so that it
  runs before config.json is rewritten.

  Refuses (ValueError) to extend a finished run with a larger total_steps: the cosine decay is
  laid out over total_steps, so the lr would jump back up mid-run while warmup and UST keep their
  old lengths. (Resuming an unfinished run with another total_steps is allowed: that is how a
  preempted run is shortened or lengthened on purpose.)
  """
  steps = checkpointing.saved_steps(workdir)
  if not steps:
    return None
  latest = max(steps)
  try:
    with open(checkpointing.config_path(workdir)) as f:
      finished_at = json.load(f).get("total_steps")
  except (OSError, ValueError):
    finished_at = None
  if finished_at is not None and latest >= finished_at and config.total_steps > finished_at:
    raise ValueError(
      f"{workdir} holds a finished run (step {latest} of total_steps={finished_at}); "
      f"continuing it to total_steps={config.total_steps} would restart the decay of its lr "
      f"schedule mid-run. Train in a new --workdir with --config.init_checkpoint={workdir} "
      "to start from its weights"
    )
  return latest
