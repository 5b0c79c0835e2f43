"""Device mesh, shardings and host->global batch conversion.

The mesh comes from `config.mesh`:

  mesh = dict(shape=(-1, 1), axes=("data", "fsdp"), axis_types="auto",
              param_rules=((".*", "fsdp"),), fsdp_min_size=2**16)

`-1` is "all remaining devices". The batch is split over every mesh axis (data and fsdp), so each
device sees `global_batch / num_devices` examples. Parameters and optimizer state follow
`param_rules`: a list of (regex, tactic) pairs matched with `re.search` against the leaf's 'a/b/c'
path in the train state (so one rule covers a parameter and its AdamW moments); the first match
wins. Tactics: "replicate", or "fsdp" (shard the largest dimension that the fsdp axis divides, for
leaves of at least `fsdp_min_size` elements; others, and every leaf when the mesh has no fsdp axis
or one of size 1, stay replicated). So the shape alone reshapes a run, e.g. on a 16-chip pod slice
`--config.mesh.shape='(4,4)'` is 4-way data x 4-way FSDP, with no code or rule change.
"""

import itertools
import math
import re
from typing import Any, Sequence

from absl import logging
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from tcl_jax.train.optim import path_str

_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def maybe_initialize_distributed(dist_config) -> None:
  """Calls `jax.distributed.initialize` when `dist_config.initialize` asks for it.

  Must run before anything touches the devices. Fields left empty ('' / -1) are passed as None so
  that JAX auto-detects them (Cloud TPU, SLURM, ...). Calling it on a single host with no
  coordinator raises, hence the opt-in flag.
  """
  if not dist_config or not dist_config.get("initialize", False):
    return
  kwargs = {}
  if dist_config.get("coordinator_address"):
    kwargs["coordinator_address"] = dist_config.coordinator_address
  if dist_config.get("num_processes", -1) >= 0:
    kwargs["num_processes"] = dist_config.num_processes
  if dist_config.get("process_id", -1) >= 0:
    kwargs["process_id"] = dist_config.process_id
  logging.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)


class OtherProcessFailed(ValueError):
  """Raised by `in_every_process` in the processes where the work succeeded but not in another."""


# One key prefix per `in_every_process` call: every process makes the same calls in the same order.
_CALLS = itertools.count()
# How long a process waits for the others to finish the same work (e.g. a slow host still reading
# a checkpoint). A process that dies without a word is caught sooner by jax.distributed's
# heartbeat (heartbeat_timeout_seconds, 100 s), which ends the others.
WAIT_FOR_OTHERS_S = 3600


def in_every_process(fn, what: str):
  """`fn()` in each process of a multi-process run (every process calls this with the same work,
  e.g. loading its copy of a checkpoint, checking its data), which then learn whether it failed
  anywhere: a process where it failed raises its own exception; the others raise
  OtherProcessFailed naming that process and its error. So one host's mistake stops every
  process at once with one line, where a collective or a barrier after it would wait out a
  timeout (Gloo's 30 s, orbax's) for a process that is gone. The outcomes travel through the
  coordination service's key-value store (jax.distributed), not through the devices. One process
  (or no jax.distributed): just `fn()`."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client  # no public API for the key-value store
  count, me = jax.process_count(), jax.process_index()
  if count == 1 or client is None:
    return fn()
  key = f"tcl_jax/in_every_process/{next(_CALLS)}"
  try:
    result = fn()
  except BaseException as e:
    why = (str(e).strip().splitlines() or [""])[0]
    if not why or not isinstance(e, ValueError | OSError):  # never "" (that says: done)
      why = f"{type(e).__name__}: {why}".rstrip(": ")
    client.key_value_set(f"{key}/{me}", why)
    raise
  client.key_value_set(f"{key}/{me}", "")
  for p in range(count):
    if p == me:
      continue
    try:
      error = client.blocking_key_value_get(f"{key}/{p}", WAIT_FOR_OTHERS_S * 1000)
    except Exception as e:  # pylint: disable=broad-except
      raise OtherProcessFailed(
        f"{what}: no word from process {p} of {count} ({str(e).splitlines()[0][:200]})"
      ) from None
    if error:
      raise OtherProcessFailed(f"{what} failed in process {p} of {count}: {error}")
  return result


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """A barrier of the processes of a multi-host run through JAX's coordination service (a no-op
  in one process). Call it where hosts may be far apart, before the collective that follows: a
  CPU collective's first use connects its processes through gloo, whose rendezvous gives up after
  30 s, so a host that compiles or writes data for longer than that would otherwise fail the
  others. Its timeout is for a process that never comes, not for slow work."""
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  _barriers.append(name)  # a key used once: every process calls the barriers in the same order
  key = f"tcl_jax:{len(_barriers)}:{name}"
  ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)


_barriers = []


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with the configured shape, axis names and types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_config.shape)
  axes = tuple(mesh_config.axes)
  if len(shape) != len(axes):
    raise ValueError(f"mesh.shape {shape} and mesh.axes {axes} differ in length")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one -1 in mesh.shape, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into mesh {shape}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh {shape} needs {math.prod(shape)} devices, have {len(devices)}")
  axis_type = _AXIS_TYPES[mesh_config.get("axis_types", "auto")]
  return jax.make_mesh(tuple(shape), axes, axis_types=(axis_type,) * len(axes), devices=devices)


def local_mesh() -> jax.sharding.Mesh | None:
  """This host's devices as a 1-D "data" mesh, for evaluation (each process evaluates its share
  of the images on its own devices); None with one local device."""
  if jax.local_device_count() == 1:
    return None
  return jax.make_mesh(
    (jax.local_device_count(),), ("data",), axis_types=(AxisType.Auto,), devices=jax.local_devices()
  )


def data_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def repl_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  # The largest dimension that the fsdp axis divides (ties: the first).
  best = None
  for i, d in enumerate(shape):
    if d % fsdp_size == 0 and (best is None or d > shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return P(*spec)


def state_shardings(mesh, abstract_tree, mesh_config):
  """NamedShardings for every leaf of `abstract_tree` (e.g. an eval_shape'd TrainState)."""
  rules = [(re.compile(r), t) for r, t in mesh_config.get("param_rules", ((".*", "replicate"),))]
  fsdp_size = dict(zip(mesh.axis_names, mesh.devices.shape)).get("fsdp", 1)
  min_size = mesh_config.get("fsdp_min_size", 2**16)

  def leaf_sharding(path, x):
    name = path_str(path)
    tactic = "replicate"
    for regex, t in rules:
      if regex.search(name):
        tactic = t
        break
    shape = getattr(x, "shape", ())
    if tactic == "replicate" or not shape:
      return NamedSharding(mesh, P())
    if tactic == "fsdp":  # replicated when the mesh has no (or a size-1) fsdp axis
      return NamedSharding(mesh, _fsdp_spec(shape, fsdp_size, min_size))
    raise ValueError(f"unknown sharding tactic {tactic!r} for {name}")

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def to_global(batch, sharding: NamedSharding):
  """Per-host numpy batch -> global jax.Arrays, batch axis split over the mesh.

  Each host passes its own `global_batch / process_count` examples; the global batch is their
  concatenation in process order.
  """
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )
