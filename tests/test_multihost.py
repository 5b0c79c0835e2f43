"""Two real JAX processes on localhost (4 CPU devices each) == one process with 8 devices.

Covers the multi-host paths of the training loop: `jax.distributed.initialize` through
`config.distributed` (sharding.maybe_initialize_distributed), per-host batch slices turned into
global arrays (sharding.to_global / make_array_from_process_local_data), a preemption notice
(SIGTERM) that reaches one process only but stops both at the same step, the per-process
iterator states gathered into the checkpoint (checkpointing.gather_input_states) and handed back
to each process on resume (checkpointing.local_input_state), sharded (fsdp) state saved and
restored by two processes, and a multi-process checkpoint restored on a single-process topology.

CPU collectives between the processes go through gloo (jax 0.12's default
`jax_cpu_collectives_implementation`, so nothing is configured for it). The data axis of the
data=4 x fsdp=2 mesh spans the processes; fsdp pairs lie within one.

Also: two processes started from a converted checkpoint directory (`config.init_checkpoint`, each
process reading its own copy) == one process started from it.

The test module doubles as the worker: `python tests/test_multihost.py WORKDIR PROCESS_ID PORT
TOTAL_STEPS OUT [SIGTERM_AT_BATCH [INIT_CHECKPOINT]]` runs one process of the two-process job.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tcl_jax import kinds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
LOCAL_DEVICES = 4
GLOBAL_BATCH = 8
TOTAL_STEPS = 4
SIGTERM_AT_BATCH = 1  # process 1 receives SIGTERM while fetching batch 1, i.e. during step 2
# Relative tolerance (per leaf) on updates and optimizer state: two processes reduce in another
# order than one; through 4 steps at lr 1e-2, a few elements near a ReLU kink go the other way and
# the worst leaf ends 1e-3 apart (measured). A lost update, step or optimizer state is O(1).
REL = 1e-2
QUIET_S = 300  # a job whose logs do not grow for this long is stuck


class HostSliceIterator:
  """This process's rows of `FakeIterator`'s deterministic global batches.

  Process p serves rows [p * b / P, (p + 1) * b / P) of global batch i; the global batch the
  mesh sees is the concatenation in process order, i.e. FakeIterator's batch i. The state names
  its process so that a resume handing a process another process's state fails loudly.
  """

  def __init__(self, fake_iterator, process_index, process_count, sigterm_at=-1):
    self.it, self.p, self.n = fake_iterator, process_index, process_count
    self.sigterm_at = sigterm_at
    self.restored = None

  def __next__(self):
    i = self.it.i
    if i == self.sigterm_at:
      # A preemption notice for this process only. JAX's preemption service (started by
      # jax.distributed.initialize) catches it and tells the other process.
      os.kill(os.getpid(), signal.SIGTERM)
    if 0 <= self.sigterm_at <= i:
      # Every batch from then on is slow, so the job cannot run to its end before the notice
      # has propagated (the other process waits for us inside each step): the agreed stop
      # point is step i + 1 when it propagates within 2 s, a later step on a loaded machine,
      # never the end (test: SIGTERM_AT_BATCH + 1 <= stop < TOTAL_STEPS) unless it takes ~6 s.
      time.sleep(2)
    batch = next(self.it)
    rows = batch["image"].shape[0] // self.n
    return {k: v[self.p * rows : (self.p + 1) * rows] for k, v in batch.items()}

  def get_state(self):
    return {"i": self.it.i, "process": self.p}

  def set_state(self, state):
    if state["process"] != self.p:
      raise AssertionError(f"process {self.p} was given the input state of {state}")
    self.restored = dict(state)
    self.it.i = int(state["i"])

  def counters(self):
    return {"bad_record": 0}


def make_config(total_steps):
  """test_train.visible_update_config (lr 1e-2: every trained leaf moves far beyond float32
  noise) with fsdp=2 over the 8 devices; a checkpoint at the end only."""
  from test_train import tcl_config  # pylint: disable=g-import-not-at-top
  from test_train import visible_update_config  # pylint: disable=g-import-not-at-top

  c = visible_update_config(total_steps=total_steps, checkpoint_every_steps=1000, log_every_steps=1)
  c.mesh = tcl_config.common.mesh_config(2)  # data=4 x fsdp=2
  c.mesh.fsdp_min_size = 0
  c.checkpoint.keep, c.checkpoint.keep_best = 10, 0
  return c


def _flat(tree):
  import jax  # pylint: disable=g-import-not-at-top

  def host(v):
    if jax.dtypes.issubdtype(getattr(v, "dtype", None), jax.dtypes.prng_key):
      v = jax.random.key_data(v)
    return np.asarray(v)

  return {jax.tree_util.keystr(k): host(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# ------------------------------------------------------------------------------------------------
# Worker (one process of the two-process job)
# ------------------------------------------------------------------------------------------------


class SlowToCompile:
  """A jitted step whose compile takes `delay_s` longer: a host slower than its peers by more than
  gloo's 30 s rendezvous (the first collective of the step connects the processes)."""

  def __init__(self, jitted, delay_s):
    self.jitted, self.delay_s = jitted, delay_s

  def lower(self, *args, **kwargs):
    time.sleep(self.delay_s)
    return self.jitted.lower(*args, **kwargs)


def worker(
  workdir, process_id, port, total_steps, out, sigterm_at=-1, init_checkpoint="", compile_delay_s=0
):
  import jax  # pylint: disable=g-import-not-at-top

  # 4 devices per process whatever XLA_FLAGS says (conftest, imported by test_train, appends
  # its 8-device flag to the environment).
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_disable_most_optimizations", True)  # as test_train's fixture
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from test_train import FakeIterator  # pylint: disable=g-import-not-at-top

  from tcl_jax import sharding  # pylint: disable=g-import-not-at-top
  from tcl_jax.train import loop as train  # pylint: disable=g-import-not-at-top

  config = make_config(total_steps)
  config.init_checkpoint = init_checkpoint
  config.distributed.update(
    initialize=True,
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=NUM_PROCESSES,
    process_id=process_id,
  )
  sharding.maybe_initialize_distributed(config.distributed)  # before anything touches devices
  assert jax.process_count() == NUM_PROCESSES and jax.process_index() == process_id
  assert jax.local_device_count() == LOCAL_DEVICES
  assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES

  if compile_delay_s:
    make = train.step_lib.make_jit_train_step
    train.step_lib.make_jit_train_step = lambda **kw: SlowToCompile(make(**kw), compile_delay_s)
  it = HostSliceIterator(
    FakeIterator(GLOBAL_BATCH, config.input.image_size), process_id, NUM_PROCESSES, sigterm_at
  )
  state, history = train.train_and_evaluate(config, workdir, train_iter=it)
  # Params are sharded over fsdp (within a process here); gather the global values.
  params = multihost_utils.process_allgather(state.params, tiled=True)
  np.savez(out + ".npz", **_flat(params))
  with open(out + ".json", "w") as f:
    json.dump(
      {
        "step": int(jax.device_get(state.step)),
        "iterator_i": it.it.i,
        "restored": it.restored,
        "losses": {str(h["step"]): h["loss"] for h in history if "loss" in h},
      },
      f,
    )


# ------------------------------------------------------------------------------------------------
# Test (pytest process: 8 devices, tests/conftest.py)
# ------------------------------------------------------------------------------------------------


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_job(
  tmp_path, name, workdir, total_steps, sigterm_at=-1, init_checkpoint="", compile_delay_s=0
):
  """Runs both processes to completion; returns their JSON results and params."""
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  procs, logs = [], []
  for p in range(NUM_PROCESSES):
    log_path = tmp_path / f"{name}_{p}.log"
    logs.append(log_path)
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      str(workdir),
      str(p),
      str(port),
      str(total_steps),
      str(tmp_path / f"{name}_{p}"),
      str(sigterm_at if p == 1 else -1),
      str(init_checkpoint),
      str(compile_delay_s if p == 1 else 0),
    ]
    with open(log_path, "w") as log:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    # A limit on silence, not on the job: a loaded machine is slow but its logs still grow.
    sizes, last = None, time.time()
    while any(proc.poll() is None for proc in procs):
      now = [os.path.getsize(path) for path in logs]
      if now != sizes:
        sizes, last = now, time.time()
      elif time.time() - last > QUIET_S:
        break
      time.sleep(0.5)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for p, proc in enumerate(procs):
    assert proc.returncode == 0, (
      f"{name} process {p} exited with {proc.returncode}:\n" + logs[p].read_text()[-4000:]
    )
  results = []
  for p in range(NUM_PROCESSES):
    with open(tmp_path / f"{name}_{p}.json") as f:
      res = json.load(f)
    res["losses"] = {int(k): v for k, v in res["losses"].items()}
    with np.load(tmp_path / f"{name}_{p}.npz") as z:
      res["params"] = dict(z)
    res["log"] = logs[p].read_text()
    results.append(res)
  return results


def test_two_processes_train_preempt_and_resume_like_one(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from test_train import FakeIterator  # pylint: disable=g-import-not-at-top
  from test_train import assert_leaves_close  # pylint: disable=g-import-not-at-top
  from test_train import assert_same_updates  # pylint: disable=g-import-not-at-top
  from test_train import flat  # pylint: disable=g-import-not-at-top

  from tcl_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  from tcl_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  from tcl_jax.train import optim  # pylint: disable=g-import-not-at-top

  multi_dir = tmp_path / "multi"
  # ---- 2 processes; process 1 alone gets SIGTERM during step SIGTERM_AT_BATCH + 1.
  first = _run_job(tmp_path, "first", multi_dir, TOTAL_STEPS, sigterm_at=SIGTERM_AT_BATCH)
  # Both processes stopped at the same step, before the end.
  stopped = first[0]["step"]
  assert [r["step"] for r in first] == [stopped] * NUM_PROCESSES
  assert SIGTERM_AT_BATCH + 1 <= stopped < TOTAL_STEPS, stopped

  # ---- The reference: one process, 8 devices, the same global batches, no interruption.
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    config = make_config(TOTAL_STEPS)
    config.checkpoint_every_steps = stopped  # its params there, to compare with the first job's
    ref_state, ref_hist = train.train_and_evaluate(
      config, str(tmp_path / "single"), train_iter=FakeIterator(GLOBAL_BATCH, 32)
    )
    # The initial params, as train_and_evaluate draws them (the frozen leaves' equality below
    # checks that these are the ones).
    model = kinds.build_model(config)
    init = _flat(jax.jit(model.init)(jax.random.split(jax.random.key(config.seed))[0]))
    labels = flat(
      optim.param_labels(
        jax.eval_shape(model.init, jax.random.key(0)),
        config.optim.frozen_regex,
        config.optim.ust_regex,
      )
    )
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
  ref_losses = {h["step"]: h["loss"] for h in ref_hist if "loss" in h}
  ref_params = _flat(jax.device_get(ref_state.params))
  assert sorted(ref_losses) == list(range(1, TOTAL_STEPS + 1))

  # ... and checkpointed there, after the same losses as the reference.
  for r in first:
    assert f"Preempted: checkpoint at step {stopped} written" in r["log"], r["log"][-3000:]
    assert r["iterator_i"] == stopped and r["restored"] is None
    assert sorted(r["losses"]) == list(range(1, stopped + 1))
    for s, loss in r["losses"].items():
      np.testing.assert_allclose(loss, ref_losses[s], rtol=1e-5, err_msg=f"step {s}")

  # The two-process params at the stop == the single-process ones at that step (its checkpoint,
  # restored into this 8-device process; so is the two-process checkpoint).
  single = checkpointing.create_checkpoint_manager(str(tmp_path / "single"), config.checkpoint)
  ref_state_at_stop = single.restore(
    stopped, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )["state"]
  single.close()
  ref_at_stop = _flat(ref_state_at_stop["params"])
  # The two-process checkpoint names devices of another topology: restore into this one's.
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ref_state_at_stop
  )
  multi = checkpointing.create_checkpoint_manager(str(multi_dir), config.checkpoint)
  assert multi.all_steps() == [stopped]
  saved = multi.restore(
    stopped,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(target), input=ocp.args.JsonRestore()),
  )
  multi.close()
  for p, r in enumerate(first):
    assert_same_updates(
      r["params"], ref_at_stop, init, labels, f"process {p} params at step {stopped}", rel=REL
    )
  # The whole checkpointed state (params, AdamW moments, step, rng) matches too.
  assert_same_updates(
    _flat(saved["state"]["params"]), ref_at_stop, init, labels, "checkpointed params", rel=REL
  )
  assert_leaves_close(_flat(saved["state"]), _flat(ref_state_at_stop), "checkpointed state", REL)
  # The input state holds both processes' iterator positions.
  assert saved["input"] == {
    "process_count": NUM_PROCESSES,
    "processes": {str(p): {"i": stopped, "process": p} for p in range(NUM_PROCESSES)},
  }

  # ---- Resume both processes in the same workdir: each gets its own iterator state back.
  # Process 1 compiles 40 s longer (a loaded host): the run waits for it at a barrier of the
  # coordination service, not in gloo's first collective, which gives up after 30 s.
  second = _run_job(tmp_path, "second", multi_dir, TOTAL_STEPS, compile_delay_s=40)
  for p, r in enumerate(second):
    assert r["restored"] == {"i": stopped, "process": p}
    assert r["step"] == TOTAL_STEPS and r["iterator_i"] == TOTAL_STEPS
    assert sorted(r["losses"]) == list(range(stopped + 1, TOTAL_STEPS + 1))
    for s, loss in r["losses"].items():
      np.testing.assert_allclose(loss, ref_losses[s], rtol=1e-5, err_msg=f"step {s}")
    assert_same_updates(r["params"], ref_params, init, labels, f"process {p} final params", rel=REL)
  # The comparison is about trained values: the params moved after the stop.
  assert any(not np.allclose(ref_params[k], ref_at_stop[k]) for k in ref_params)


def test_two_processes_start_from_a_converted_checkpoint_like_one(tmp_path):
  """`config.init_checkpoint` = a converted directory (the recipe on a pod starts from converted
  CLIP weights): every process reads it onto its own devices. Before, process 1 failed at once
  (orbax restored every array onto global device 0, which only process 0 has)."""
  import jax  # pylint: disable=g-import-not-at-top
  from test_train import FakeIterator  # pylint: disable=g-import-not-at-top
  from test_train import assert_same_updates  # pylint: disable=g-import-not-at-top
  from test_train import flat  # pylint: disable=g-import-not-at-top

  from tcl_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  from tcl_jax.train import optim  # pylint: disable=g-import-not-at-top
  from tcl_jax.weights import model_files  # pylint: disable=g-import-not-at-top

  steps = 2
  config = make_config(steps)
  model = kinds.build_model(config)
  # Weights other than the run's random init (seed 7): frozen leaves equal to them below show
  # that both runs started from the file. Saved from one device, as `python -m tcl_jax.convert`
  # saves (orbax records that device; host arrays would record none).
  on_device = jax.jit(model.init)(jax.random.key(7))
  assert len(jax.tree.leaves(on_device)[0].devices()) == 1
  ckpt = tmp_path / "converted"
  model_files.save_checkpoint(ckpt, model.cfg, on_device)
  start = jax.device_get(on_device)

  multi = _run_job(tmp_path, "init", tmp_path / "multi", steps, init_checkpoint=ckpt)

  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    config.init_checkpoint = str(ckpt)
    ref_state, ref_hist = train.train_and_evaluate(
      config, str(tmp_path / "single"), train_iter=FakeIterator(GLOBAL_BATCH, 32)
    )
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
  ref_losses = {h["step"]: h["loss"] for h in ref_hist if "loss" in h}
  assert sorted(ref_losses) == list(range(1, steps + 1))
  labels = flat(
    optim.param_labels(
      jax.eval_shape(model.init, jax.random.key(0)),
      config.optim.frozen_regex,
      config.optim.ust_regex,
    )
  )
  for p, r in enumerate(multi):
    assert r["step"] == steps
    for s, loss in r["losses"].items():
      np.testing.assert_allclose(loss, ref_losses[s], rtol=1e-5, err_msg=f"process {p} step {s}")
    assert_same_updates(
      r["params"],
      _flat(jax.device_get(ref_state.params)),
      _flat(start),
      labels,
      f"process {p} params after {steps} steps from the checkpoint",
      rel=REL,
    )


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # test_train, conftest
  _workdir, _pid, _port, _total, _out = sys.argv[1:6]
  worker(
    _workdir,
    int(_pid),
    int(_port),
    int(_total),
    _out,
    int(sys.argv[6]) if len(sys.argv) > 6 else -1,
    sys.argv[7] if len(sys.argv) > 7 else "",
    int(sys.argv[8]) if len(sys.argv) > 8 else 0,
  )
