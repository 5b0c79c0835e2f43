"""Orbax checkpoints of the train state and the input-iterator position.

Layout: `<workdir>/checkpoints/<step>/{state,input}`; `state` is the TrainState pytree (params,
optimizer state, step, rng key) written with StandardSave, `input` is the iterator's JSON state.
Every process calls save/restore (orbax coordinates the writes; saving on process 0 only hangs
multi-host jobs). Restores go into an abstract target that carries the shardings, so a restart
on another topology lands on the right devices.

Input state: each host reads its own files, so each has its own iterator position. The JSON item
holds all of them, `{"process_count": P, "processes": {"0": state_0, ...}}`, gathered at save time
(orbax writes JSON items from the primary host only).

Retention: the latest `keep` checkpoints plus the `keep_best` ones with the highest eval mIoU.
A step is saved before it is evaluated (an evaluation that fails or is killed loses no training),
so its mIoU is recorded afterwards (`record_eval`) and ranks it from the next save on.
"""

import dataclasses
import json
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

# The training workdir's layout; every module that reads a workdir asks here.
CHECKPOINTS = "checkpoints"  # <workdir>/checkpoints/<step>/{state,input}
ITEMS = ("state", "input")
CONFIG = "config.json"  # the run's config (ml_collections JSON), written at start


def checkpoints_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, CHECKPOINTS))


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG)


def is_training_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, CHECKPOINTS)) and os.path.isfile(config_path(path))


def saved_steps(workdir: str) -> list[int]:
  """The steps with a checkpoint directory, read from the files (no manager needed)."""
  d = checkpoints_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def expand_workdir(path: str, workdir: str) -> str:
  """A config path with `{workdir}` in it (e.g. "{workdir}/data/eval") made concrete."""
  return path.format(workdir=workdir)


@dataclasses.dataclass
class BestEvaluated:
  """An orbax preservation policy: the `n` checkpoints with the highest mIoU in `scores` (step ->
  mIoU, filled by record_eval after each evaluation); steps never evaluated are not ranked."""

  n: int
  scores: dict = dataclasses.field(default_factory=dict)

  def should_preserve(self, checkpoints, *, context):
    del context
    ranked = sorted((c.step for c in checkpoints if c.step in self.scores), key=self.scores.get)
    best = set(ranked[-self.n :]) if self.n > 0 else set()
    return [c.step in best for c in checkpoints]


def create_checkpoint_manager(workdir: str, ckpt_config) -> ocp.CheckpointManager:
  """CheckpointManager under `<workdir>/checkpoints` (saving steps are decided by the caller)."""
  policies = [ocp.checkpoint_managers.LatestN(n=max(int(ckpt_config.keep), 1))]
  best = BestEvaluated(n=int(ckpt_config.get("keep_best", 0)))
  if best.n:
    policies.append(best)
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=1,
    preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
    enable_async_checkpointing=bool(ckpt_config.get("async_save", True)),
    create=True,
  )
  mngr = ocp.CheckpointManager(checkpoints_dir(workdir), options=options, item_names=ITEMS)
  mngr.tcl_eval_scores = best.scores  # record_eval's
  return mngr


def record_eval(mngr: ocp.CheckpointManager, step: int, miou: float) -> None:
  """The evaluation mIoU of the checkpoint saved at `step`, for keep_best (in memory: a restarted
  run ranks the checkpoints it evaluates itself)."""
  scores = getattr(mngr, "tcl_eval_scores", None)
  if scores is not None:
    scores[step] = float(miou)


def save(mngr: ocp.CheckpointManager, step: int, state, input_state: dict | None) -> bool:
  """Saves (possibly asynchronously) `state` and the iterator state at `step`."""
  if mngr.latest_step() == step:  # e.g. a final save right after a periodic one
    return False
  saved = mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      input=ocp.args.JsonSave(input_state if input_state is not None else {}),
    ),
    force=True,
  )
  if saved:
    logging.info("Checkpoint at step %d", step)
  return saved


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  """(state, input_state) at `step`, laid out as `abstract_state` (ShapeDtypeStructs with
  shardings)."""
  restored = mngr.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), input=ocp.args.JsonRestore()
    ),
  )
  return restored["state"], restored["input"]


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry the target shardings (the restore target)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
  )


def gather_input_states(local_state: dict) -> dict:
  """All processes' iterator states in one JSON-able dict (a collective on multi-host)."""
  count = jax.process_count()
  if count == 1:
    return {"process_count": 1, "processes": {"0": local_state}}
  data = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
  size = int(np.max(multihost_utils.process_allgather(np.array([data.size], np.int32))))
  padded = np.zeros([size], np.uint8)
  padded[: data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, size]
  states = {}
  for i in range(count):
    raw = bytes(gathered[i]).rstrip(b"\0")
    states[str(i)] = json.loads(raw.decode()) if raw else {}
  return {"process_count": count, "processes": states}


def local_input_state(saved: dict | None) -> dict | None:
  """This process's iterator state from `gather_input_states`' output (None if unusable)."""
  if not saved:
    return None
  if "processes" not in saved:  # a bare single-process state
    return saved
  if int(saved.get("process_count", 1)) != jax.process_count():
    logging.warning(
      "Checkpoint input state is for %s processes, running %d: the input "
      "pipeline restarts from its beginning.",
      saved.get("process_count"),
      jax.process_count(),
    )
    return None
  return saved["processes"].get(str(jax.process_index()))
