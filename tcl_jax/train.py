"""TCL training loop: `train_and_evaluate(config, workdir)`.

Setup follows big_vision's order: logging -> mesh -> input pipeline (started early) -> model and
optimizer shapes (`jax.eval_shape`) -> shardings -> resume / init-from-checkpoint / random init
(`jax.jit(..., out_shardings=...)`, so full parameters are never built on one host) -> the jitted
`train_step` (tcl_jax.train_step) -> the loop with periodic log / image / eval / checkpoint
actions. Models come from the registry (tcl_jax.kinds), inputs from tcl_jax.train_inputs, stop
requests from tcl_jax.preemption, reports from tcl_jax.summaries.
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

from tcl_jax import checkpointing
from tcl_jax import kinds
from tcl_jax import optim
from tcl_jax import preemption as preemption_lib
from tcl_jax import sharding
from tcl_jax import summaries
from tcl_jax import train_inputs
from tcl_jax import train_step as step_lib
from tcl_jax.kinds import base
from tcl_jax.models import clip as clip_lib
from tcl_jax.zeroshot import evaluator


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


def init_rngs(config):
  """(init_rng, state_rng): the parameter init key and the train state's key, from config.seed."""
  return jax.random.split(jax.random.key(config.seed))


def initial_params(model: base.Model, config, workdir: str, abstract_params=None,
                   params_sharding=None):
  """The parameters a new run starts from: `config.init_checkpoint` (its `{workdir}` expanded)
  loaded by the model kind, else the model's random init with init_rngs' key."""
  if config.get("init_checkpoint"):
    path = checkpointing.expand_workdir(config.init_checkpoint, workdir)
    logging.info("Initialising parameters from %s", path)
    params = model.load(path)
    if abstract_params is not None:
      params = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), params, abstract_params)
    return params if params_sharding is None else jax.device_put(params, params_sharding)
  init_rng, _ = init_rngs(config)
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
  # With several processes each host evaluates the whole set on one local device for now.
  if jax.process_count() > 1 or mesh is None or mesh.devices.size == 1:
    mesh = None
  return evaluator.evaluate_config(model.zero_shot, params, eval_config, mesh=mesh,
                                   progress=False)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def train_and_evaluate(config: "ml_collections.ConfigDict", workdir: str, *,
                       model: base.Model | None = None, train_iter=None,
                       devices=None) -> tuple[step_lib.TrainState, list[dict]]:
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
  is_chief = jax.process_index() == 0
  # A run with nothing to train writes neither an (empty) TensorBoard events file nor a
  # config.json that would no longer describe the checkpoints.
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief or idle)
  if is_chief and not idle:
    with open(checkpointing.config_path(workdir), "w") as f:
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
  train_inputs.prepare_synthetic_data(config, workdir)
  if train_iter is None:
    train_iter = train_inputs.make_train_iterator(config, workdir)

  # ---------------------------------------------------------------- model and optimizer shapes
  if model is None:
    model = kinds.build_model(config)
  if config.get("evals") and config.evals.get("tasks") and model.zero_shot is None:
    raise ValueError("this model kind has no zero-shot segmentation: set --config.evals.tasks=''")
  init_rng, state_rng = init_rngs(config)
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
      functools.partial(step_lib.create_train_state, tx=tx), abstract_params, state_rng)

  # ---------------------------------------------------------------- shardings
  state_sharding = sharding.state_shardings(mesh, abstract_state, config.mesh)
  params_sharding = state_sharding.params

  with jax.set_mesh(mesh):
    # -------------------------------------------------------------- resume / init
    mngr = checkpointing.create_checkpoint_manager(workdir, config.checkpoint)
    latest = mngr.latest_step()
    jit_create = jax.jit(functools.partial(step_lib.create_train_state, tx=tx),
                         in_shardings=(params_sharding, repl), out_shardings=state_sharding)
    if latest is not None:
      logging.info("Resuming from %s step %d", mngr.directory, latest)
      target = checkpointing.abstract_with_shardings(abstract_state, state_sharding)
      state, input_states = checkpointing.restore(mngr, latest, target)
      local_input_state = checkpointing.local_input_state(input_states)
      if local_input_state and hasattr(train_iter, "set_state"):
        train_iter.set_state(local_input_state)
    else:
      params = initial_params(model, config, workdir, abstract_params, params_sharding)
      state = jit_create(params, state_rng)
    first_step = int(jax.device_get(state.step))

    # -------------------------------------------------------------- train step
    jit_step = step_lib.make_jit_train_step(model=model, tx=tx, labels=labels, schedule=schedule,
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
    mean = np.asarray(clip_lib.IMAGE_MEAN, np.float32)  # what the input pipeline normalised with
    std = np.asarray(clip_lib.IMAGE_STD, np.float32)

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
      with preemption_lib.Preemption() as preemption:
        while step < total:
          before = train_iter.get_state() if hasattr(train_iter, "get_state") else {}
          host_batch = preemption_lib.next_batch(train_iter, preemption)
          if host_batch is None:  # SIGTERM while waiting for data: keep the steps done so far
            if step > first_step:
              check_finite(step, prev_metrics)
              checkpointing.save(mngr, step, state, checkpointing.gather_input_states(before))
            logging.warning("Preempted while waiting for input data: stopped at step %d.", step)
            preempted = True
            break
          batch = sharding.to_global({k: host_batch[k] for k in step_lib.BATCH_KEYS},
                                     batch_sharding)
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
            avg = summaries.mean_metrics(pending)
            pending = []
            scalars = {f"train/{k}": v for k, v in avg.items()}
            scalars.update({f"perf/{k}": v for k, v in summaries.peak_memory_metrics().items()})
            if hasattr(train_iter, "counters"):
              scalars.update({f"input/{k}": float(v) for k, v in train_iter.counters().items()})
            writer.write_scalars(step, scalars)
            history.append({"step": step, "loop_time_s": time.time() - t_start, **avg})

          if image_every and every(image_every, step) and "soft_pos_mask" in extras and is_chief:
            n = extras["soft_pos_mask"].shape[0]
            grid = summaries.mask_overlay_grid(np.asarray(host_batch["image"][:n]),
                                     jax.device_get(extras["soft_pos_mask"]), mean, std)
            writer.write_images(step, {"train/masks": grid[None]})

          stop = preemption.should_stop(step)  # (a sync point on multi-host: once per step)
          eval_metrics = None
          if not stop and (every(config.get("eval_every_steps", 0), step) or (
              step == total and config.get("eval_at_end", True))):
            check_finite(step, metrics)
            timed = report.timed("eval") if report else contextlib.nullcontext()
            with timed:
              results = run_evaluation(state.params, model, config, workdir, mesh)
            if results is not None:
              eval_metrics = summaries.eval_scalars(results)
              writer.write_scalars(step, eval_metrics)
              logged.append({"step": step, **eval_metrics})

          if (every(config.checkpoint_every_steps, step) or step == total or stop
              or eval_metrics is not None):
            check_finite(step, metrics)
            best = ({"miou": eval_metrics[summaries.AVERAGE_MIOU]}
                    if eval_metrics and summaries.AVERAGE_MIOU in eval_metrics else None)
            timed = report.timed("checkpoint") if report else contextlib.nullcontext()
            with timed:
              if checkpointing.save(mngr, step, state, input_state_now(), metrics=best):
                saved.append(step)
          if stop:
            logging.warning("Preempted: checkpoint at step %d written, exiting.", step)
            preempted = True
            break
        interrupted = preemption.interrupted
    finally:
      mngr.wait_until_finished()
      mngr.close()
      writer.flush()
    if not preempted:
      logging.info("Training done: %d steps in %.1fs", step - first_step, time.time() - t_start)
  if is_chief:
    print(summaries.format_run_summary(workdir, first_step, step, time.time() - t_enter, history,
                                       logged, saved), flush=True)
  if preempted and interrupted:  # Ctrl-C: the work is saved; the caller says so and exits
    raise preemption_lib.Interrupted(step, checkpointing.checkpoints_dir(workdir))
  return state, history + logged


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
        "to start from its weights")
  return latest
