"""tf.data training input for image-text TFRecords (schema: ``schema.py``).

Usage from the training loop::

    it = make_train_iterator("/data/cc3m/train-*.tfrecord", global_batch_size=4096, seed=0)
    batch = next(it)       # {"image": f32 [b, 224, 224, 3], "text_tokens": i32 [b, 77]}
    state = it.get_state()  # small JSON-able dict; store it with the checkpoint
    it.set_state(state)     # later: continues with exactly the batches that followed
    it.counters()           # {"corrupt_image": n, "bad_record": n, ...} for logging

Per epoch and host the pipeline is::

    this host's files (sorted, every process_count-th), permuted by (seed, epoch)
    -> interleave TFRecord readers (a sentinel after each file, see below)
    -> shuffle(shuffle_buffer, seeded) -> enumerate -> [skip(position) on resume]
    -> parse -> scan: count/flag drops -> filter
    -> decode + augment (stateless random ops keyed by (seed, epoch, host, index))
    -> scan: count decode failures -> batch(global_batch_size // process_count)
    -> flip (where still to do) + normalise the batch in one XLA-fused op
    -> tokenize captions -> prefetch

Determinism: ``Options.deterministic`` plus seeded shuffle plus per-example
stateless randomness make the batches a function of (files, seed, host) only.

Resuming: the state is ``{"epoch", "position", "counts"}`` where ``position``
is the number of shuffled raw records of the epoch consumed by the delivered
batches (every example carries its index). Restoring rebuilds the epoch's
dataset and ``skip``s that many records *before* parsing/decoding, so it costs
one pass of raw reading up to that point, not decoding. This avoids saving
tf.data iterator checkpoints, which would hold the whole shuffle buffer.

Bad data never raises. Drops are counted by reason:

* ``bad_record``: a record that is not a parseable ``tf.train.Example``
  (found as a gap in the running index after ``ignore_errors``);
* ``missing_image`` / ``empty_caption``: the feature is absent or empty
  (after stripping whitespace);
* ``corrupt_image``: decoding failed (JPEGs are decoded only inside the crop
  window, so damage outside it can go unnoticed -- the converter already
  rejects images PIL cannot decode);
* ``bad_shard``: a file whose reading stopped early (truncated file, CRC
  error, unreadable after listing); the rest of that file is lost. Detected
  by comparing the bytes read with the file's size;
* ``unreadable_shard``: a listed file that cannot be stat'ed at all.

The counts travel with each example through ``scan`` ops, so ``counters()``
reflects exactly what lies before the last delivered batch, and survives
``get_state``/``set_state``.

Bad data is also named: a WARNING line per bad shard or record (reason, file,
and the record's key, or its number in the file when it has no parseable key),
each once per process and at most ``BadDataLog.burst`` lines a minute (see
:class:`BadDataLog`). Records dropped by ``ignore_errors`` leave only a gap in
the running index, so each element's file (and key) is kept in a hash table
until the element is seen past the step that can drop it.

A full pass over the files that yields not a single batch (every record bad,
or fewer good records than one batch) raises ``ValueError`` naming the files,
instead of starting the next epoch forever.

Tokenization: captions are tokenized per batch in the pipeline with
``tcl_jax.tokenizer.tokenize`` via ``tf.numpy_function``. Storing ids at
write time (``convert --tokenize`` + ``tokens_from_record=True``) is also
supported; ``python -m tcl_jax.data.bench`` measures both: the difference is
within noise (the tokenizer does ~30k captions/s/core against a few hundred
decoded images/s), so the default keeps records tokenizer-independent.
"""

from __future__ import annotations

import glob as _glob
import threading
import time

from absl import logging
import numpy as np
import tensorflow as tf

from tcl_jax.data import schema
from tcl_jax.data.augment import AugmentConfig
from tcl_jax.data.augment import decode_center
from tcl_jax.data.augment import finish_batch
from tcl_jax.data.augment import train_augment_pixels

REASONS = ("bad_record", "empty_caption", "missing_image", "corrupt_image", "bad_shard")
_R = {r: i for i, r in enumerate(REASONS)}

# element kinds in the raw stream
_REC, _EOF_OK, _EOF_BAD, _END = 0, 1, 2, 3
_TFRECORD_OVERHEAD = 16  # length (8) + length crc (4) + data crc (4)


class BadDataLog:
  """Names bad data on the log: each (reason, file, key) once per process, at
  most ``burst`` lines per ``period`` seconds; the next line after a full
  window says how many were held back. The counters count everything."""

  def __init__(self, burst: int = 10, period: float = 60.0):
    self.burst, self.period = burst, period
    self._seen = set()
    self._window = (-float("inf"), 0)  # (start, lines written in it)
    self._held_back = 0
    self._lock = threading.Lock()

  def report(self, reason: str, path: str, which: str = "") -> None:
    """``which``: the record in the file (its key or number), if any."""
    item = (reason, path, which)
    with self._lock:
      if item in self._seen:
        return
      start, lines = self._window
      now = time.monotonic()
      if now - start >= self.period:
        start, lines = now, 0
      if lines >= self.burst:
        self._held_back += 1
        return
      self._window = (start, lines + 1)
      self._seen.add(item)
      held, self._held_back = self._held_back, 0
    logging.warning(
      "input: %s: %s%s%s",
      reason,
      path,
      f", {which}" if which else "",
      f" [{held} more bad records/files not named: rate limit]" if held else "",
    )


BAD_DATA_LOG = BadDataLog()


def _report_bad(reasons, names):
  """numpy_function body; ``names``: path, path + NUL + record number in the
  file, or path + NUL + record number + NUL + key (as bytes)."""
  for r, n in zip(reasons.tolist(), names.tolist()):
    path, recno, key = (n.decode("utf-8", "replace").split("\0", 2) + ["", ""])[:3]
    BAD_DATA_LOG.report(
      REASONS[r],
      path,
      f"key {key!r}" if key else f"record {recno} (counting from 0)" if recno else "",
    )
  return np.int64(0)


def _log_bad_if(pred, reasons_and_names):
  """In a ``scan`` step: reports ``reasons_and_names()`` (built only where ``pred``
  holds, so that clean elements run none of it); returns 0 for a control
  dependency of what the step outputs."""
  return tf.cond(
    pred,
    lambda: tf.numpy_function(_report_bad, list(reasons_and_names()), tf.int64, stateful=True),
    lambda: tf.constant(0, tf.int64),
  )


def _table():
  return tf.lookup.experimental.MutableHashTable(tf.int64, tf.string, default_value=b"")


def list_files(file_pattern_or_list) -> list[str]:
  """Expand a glob / brace pattern / comma list (or a list of them), sorted."""
  from tcl_jax.data.convert import expand_braces

  items = (
    [file_pattern_or_list] if isinstance(file_pattern_or_list, str) else list(file_pattern_or_list)
  )
  out = []
  for item in items:
    for part in item.split(","):
      for p in expand_braces(part):
        if any(c in p for c in "*?["):
          out.extend(tf.io.gfile.glob(p) if "://" in p else _glob.glob(p))
        else:
          out.append(p)
  return sorted(set(out))


def host_files(files: list[str], process_index: int, process_count: int) -> list[str]:
  """File-level sharding: host i reads files i, i + n, i + 2n, ... of the sorted list."""
  mine = sorted(files)[process_index::process_count]
  if not mine:
    raise ValueError(
      f"{len(files)} files cannot be shared by {process_count} processes; "
      "write more shards (convert --num-shards)"
    )
  return mine


def _file_size(path: str) -> int | None:
  try:
    return int(tf.io.gfile.stat(path).length)
  except Exception:  # missing, permission, ...
    return None


def _read_file(path, size):
  """Records of one file followed by a sentinel saying whether all of it was read:
  (record, kind, name); a record's name is its path + NUL + its number in the file."""
  recs = tf.data.TFRecordDataset(path).ignore_errors()
  recs = recs.map(lambda r: (r, tf.constant(_REC)))
  eof = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(_EOF_OK)))

  def account(state, elem):
    total, n_recs = state
    rec, kind = elem
    is_rec = tf.equal(kind, _REC)
    n = tf.cast(tf.strings.length(rec), tf.int64) + _TFRECORD_OVERHEAD
    total = total + tf.where(is_rec, n, tf.constant(0, tf.int64))
    kind = tf.where(is_rec, kind, tf.where(tf.equal(total, size), _EOF_OK, _EOF_BAD))
    name = tf.where(is_rec, tf.strings.join([path, tf.strings.as_string(n_recs)], "\0"), path)
    return (total, n_recs + tf.cast(is_rec, tf.int64)), (rec, kind, name)

  zero = tf.constant(0, tf.int64)
  return recs.concatenate(eof).scan((zero, zero), account)


def _records(
  paths,
  lens,
  num_files: int,
  *,
  cycle_length: int,
  par,
  shuffle_buffer: int,
  shuffle_seed: int,
  start_position: int,
) -> tf.data.Dataset:
  """(index, (record, kind, name)) of this host's files, interleaved, shuffled, with the end
  marker appended, from ``start_position`` on."""
  ds = tf.data.Dataset.from_tensor_slices((paths, lens)).take(num_files)
  ds = ds.interleave(
    _read_file,
    cycle_length=max(1, min(cycle_length, num_files)),
    block_length=1,
    num_parallel_calls=par,
    deterministic=True,
  )
  if shuffle_buffer > 1:
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  # The end marker (index = number of raw elements) flushes the counters.
  ds = ds.concatenate(
    tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(_END), tf.constant(b"")))
  )
  ds = ds.enumerate()
  if start_position:
    ds = ds.skip(start_position)

  return ds


def _parse_and_check(
  ds, names_by_idx, *, start_position: int, par, tokens_from_record: bool, context_length: int
) -> tf.data.Dataset:
  """Parsed examples; records that fail to parse, lack an image or a caption, or come from a
  bad shard are counted (``counts``), named in the log and dropped."""
  spec = schema.parse_spec(with_tokens=tokens_from_record, context_length=context_length)

  def parse(idx, elem):
    rec, kind, name = elem
    with tf.control_dependencies([names_by_idx.insert(idx[None], name[None])]):
      # Non-records (sentinels) parse as an empty Example: every feature default.
      ex = tf.io.parse_single_example(tf.where(tf.equal(kind, _REC), rec, b""), spec)
    ex["idx"] = idx
    ex["kind"] = kind
    ex["name"] = name
    return ex

  ds = ds.map(parse, num_parallel_calls=par, deterministic=True).ignore_errors()

  def check(state, ex):
    last, counts, ordinal = state
    rec = tf.equal(ex["kind"], _REC)
    no_image = rec & tf.equal(tf.strings.length(ex[schema.IMAGE]), 0)
    no_caption = (
      rec & ~no_image & tf.equal(tf.strings.length(tf.strings.strip(ex[schema.CAPTION])), 0)
    )
    bad_shard = tf.equal(ex["kind"], _EOF_BAD)
    lost = ex["idx"] - last - 1  # records lost to parse errors
    add = tf.stack(
      [
        lost,
        tf.cast(no_caption, tf.int64),
        tf.cast(no_image, tf.int64),
        tf.constant(0, tf.int64),
        tf.cast(bad_shard, tf.int64),
      ]
    )

    def bad():
      own = tf.stack([no_caption, no_image, bad_shard])
      reasons = tf.concat(
        [
          tf.fill([lost], _R["bad_record"]),
          tf.boolean_mask([_R["empty_caption"], _R["missing_image"], _R["bad_shard"]], own),
        ],
        0,
      )
      own_name = tf.strings.join([ex["name"], ex[schema.KEY]], "\0")
      return reasons, tf.concat(
        [
          names_by_idx.lookup(tf.range(last + 1, ex["idx"])),
          tf.boolean_mask(tf.fill([3], own_name), own),
        ],
        0,
      )

    logged = _log_bad_if((lost > 0) | no_caption | no_image | bad_shard, bad)
    with tf.control_dependencies([logged]):  # names up to here are not needed any more
      forget = names_by_idx.remove(tf.range(last + 1, ex["idx"] + 1))
    with tf.control_dependencies([forget]):
      counts = counts + add
    valid = (rec & ~no_image & ~no_caption) | tf.equal(ex["kind"], _END)
    ordinal = ordinal + tf.cast(valid, tf.int64)
    out = dict(ex, counts=counts, ordinal=ordinal, valid=valid)
    return (ex["idx"], counts, ordinal), out

  init = (
    tf.constant(start_position - 1, tf.int64),
    tf.zeros([len(REASONS)], tf.int64),
    tf.constant(-1, tf.int64),
  )
  ds = ds.scan(init, check).filter(lambda ex: ex["valid"])

  return ds


def _decode(
  ds, names_by_ordinal, base_seed, *, augment, image_size: int, par, tokens_from_record: bool
) -> tf.data.Dataset:
  """Decoded (and, with ``augment``, augmented) images at pixel scale; images that fail to
  decode are counted as ``corrupt_image`` and named."""

  def decode(ex):
    is_end = tf.equal(ex["kind"], _END)
    keep_name = names_by_ordinal.insert(
      ex["ordinal"][None], tf.strings.join([ex["name"], ex[schema.KEY]], "\0")[None]
    )
    if augment:
      ex_seed = tf.random.experimental.stateless_fold_in(base_seed, ex["idx"])
      fn = lambda: train_augment_pixels(ex[schema.IMAGE], ex_seed, augment)  # noqa: E731
    else:
      fn = lambda: (
        decode_center(ex[schema.IMAGE], image_size),  # noqa: E731
        tf.constant(False),
      )
    # pixel scale; flipped (if still to do) and normalised per batch
    with tf.control_dependencies([keep_name]):
      img, flip = tf.cond(
        is_end, lambda: (tf.zeros([image_size, image_size, 3]), tf.constant(False)), fn
      )
    out = {
      "image": tf.ensure_shape(img, [image_size, image_size, 3]),
      "flip": flip,
      "caption": ex[schema.CAPTION],
      "key": ex[schema.KEY],
      "idx": ex["idx"],
      "kind": ex["kind"],
      "counts": ex["counts"],
      "ordinal": ex["ordinal"],
    }
    if tokens_from_record:
      out["text_tokens"] = tf.cast(ex[schema.TOKENS], tf.int32)
    return out

  ds = ds.map(decode, num_parallel_calls=par, deterministic=True).ignore_errors()

  def count_decode_failures(state, ex):
    last, failed = state
    lost = ex["ordinal"] - last - 1
    logged = _log_bad_if(
      lost > 0,
      lambda: (
        tf.fill([lost], _R["corrupt_image"]),
        names_by_ordinal.lookup(tf.range(last + 1, ex["ordinal"])),
      ),
    )
    with tf.control_dependencies([logged]):
      forget = names_by_ordinal.remove(tf.range(last + 1, ex["ordinal"] + 1))
    with tf.control_dependencies([forget]):
      failed = failed + lost
    out = {k: v for k, v in ex.items() if k != "ordinal"}
    out["counts"] = (
      ex["counts"] + tf.one_hot(_R["corrupt_image"], len(REASONS), dtype=tf.int64) * failed
    )
    return (ex["ordinal"], failed), out

  ds = ds.scan((tf.constant(-1, tf.int64), tf.constant(0, tf.int64)), count_decode_failures)
  return ds


def _batch(
  ds,
  batch: int,
  *,
  augment,
  tokens_from_record: bool,
  context_length: int,
  with_metadata: bool,
  prefetch: int,
) -> tf.data.Dataset:
  """Per-host batches: flipped and normalised, tokenized, metadata kept or dropped."""
  # The end marker may land in a full-size batch; DataIterator drops that
  # batch (it holds < batch real examples), so no drop_remainder here.
  ds = ds.batch(batch, drop_remainder=False)
  use_xla = augment.xla if augment else True

  def finish(b):
    b = dict(b, image=finish_batch(b["image"], b["flip"], use_xla))
    del b["flip"]
    return b

  ds = ds.map(finish)

  if not tokens_from_record:

    def tok(captions):
      from tcl_jax.tokenizer import tokenize

      texts = [c.decode("utf-8", errors="replace") for c in captions.tolist()]
      return tokenize(texts, context_length=context_length).astype(np.int32)

    def add_tokens(b):
      t = tf.numpy_function(tok, [b["caption"]], tf.int32, stateful=False)
      b = dict(b, text_tokens=tf.ensure_shape(t, [None, context_length]))
      return b

    ds = ds.map(add_tokens)
  ds = ds.map(lambda b: {k: v for k, v in b.items() if k != "caption"})
  if not with_metadata:
    # plain use: drop the final batch (remainder + end marker) and the extras
    ds = ds.filter(lambda b: tf.reduce_all(tf.not_equal(b["kind"], _END)))
    ds = ds.map(lambda b: {"image": b["image"], "text_tokens": b["text_tokens"]})
  ds = ds.prefetch(prefetch)

  return ds


def build_epoch_dataset(
  file_pattern_or_list,
  *,
  global_batch_size: int,
  seed: int,
  image_size: int = 224,
  process_index: int | None = None,
  process_count: int | None = None,
  augment: AugmentConfig | bool | None = True,
  shuffle_buffer: int = 10_000,
  epoch: int = 0,
  start_position: int = 0,
  cycle_length: int = 16,
  num_parallel_calls: int | None = None,
  threads: int | None = None,
  tokens_from_record: bool = False,
  context_length: int = 77,
  prefetch: int = 2,
  with_metadata: bool = True,
) -> tuple[tf.data.Dataset, list[str], int]:
  """One epoch of per-host training batches as a ``tf.data.Dataset``.

  ``augment``: True / an ``AugmentConfig`` -> training augmentation (the
  config's ``image_size`` is replaced by ``image_size``); False / None ->
  deterministic short-side resize + centre crop (for checks and eval-like use).

  Elements are dicts with ``image`` f32 [b, S, S, 3] (ImageNet-normalised),
  ``text_tokens`` i32 [b, 77] and, with ``with_metadata``, ``key``, ``idx``,
  ``kind`` and ``counts`` used by :class:`DataIterator` (which also drops the
  final partial batch that carries the end-of-epoch marker). Prefer
  :func:`make_train_iterator` unless you manage epochs yourself.

  Returns (dataset, this host's files, number of files that cannot be read).
  """
  import jax  # only for the process defaults

  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
    )
  batch = global_batch_size // process_count
  if augment is True:
    augment = AugmentConfig(image_size=image_size)
  elif isinstance(augment, AugmentConfig) and augment.image_size != image_size:
    import dataclasses

    augment = dataclasses.replace(augment, image_size=image_size)
  par = num_parallel_calls or tf.data.AUTOTUNE

  files = host_files(list_files(file_pattern_or_list), process_index, process_count)
  rng = np.random.default_rng([seed, epoch, process_index])
  files = [files[i] for i in rng.permutation(len(files))]
  sizes = [_file_size(f) for f in files]
  readable = [(f, s) for f, s in zip(files, sizes) if s is not None]
  for f, s in zip(files, sizes):
    if s is None:
      BAD_DATA_LOG.report("unreadable_shard", f)
  shuffle_seed = int(rng.integers(0, 2**31 - 1))
  paths = tf.constant([f for f, _ in readable] or [""], tf.string)
  lens = tf.constant([s for _, s in readable] or [0], tf.int64)

  ds = _records(
    paths,
    lens,
    len(readable),
    cycle_length=cycle_length,
    par=par,
    shuffle_buffer=shuffle_buffer,
    shuffle_seed=shuffle_seed,
    start_position=start_position,
  )
  # Names of the elements that the next ignore_errors may drop, until seen past it.
  names_by_idx, names_by_ordinal = _table(), _table()
  ds = _parse_and_check(
    ds,
    names_by_idx,
    start_position=start_position,
    par=par,
    tokens_from_record=tokens_from_record,
    context_length=context_length,
  )
  base_seed = tf.random.experimental.stateless_fold_in(
    tf.constant([seed, epoch], tf.int64), process_index
  )

  ds = _decode(
    ds,
    names_by_ordinal,
    base_seed,
    augment=augment,
    image_size=image_size,
    par=par,
    tokens_from_record=tokens_from_record,
  )
  ds = _batch(
    ds,
    batch,
    augment=augment,
    tokens_from_record=tokens_from_record,
    context_length=context_length,
    with_metadata=with_metadata,
    prefetch=prefetch,
  )

  opts = tf.data.Options()
  opts.deterministic = True
  if threads:
    opts.threading.private_threadpool_size = threads
  opts.threading.max_intra_op_parallelism = 1
  return ds.with_options(opts), files, len(files) - len(readable)


def make_train_dataset(file_pattern_or_list, **kwargs) -> tf.data.Dataset:
  """One epoch of per-host batches as a ``tf.data.Dataset``; arguments as
  :func:`build_epoch_dataset` (which also returns the file list and the
  unreadable-file count)."""
  return build_epoch_dataset(file_pattern_or_list, **kwargs)[0]


class DataIterator:
  """Endless (or ``num_epochs``) iterator of per-host numpy batches.

  ``next(it)`` -> ``{"image": float32 [b, S, S, 3], "text_tokens": int32 [b, 77]}``
  (plus ``"key"``: object array of bytes, if ``with_keys``).
  ``get_state()`` -> ``{"epoch": int, "position": int, "counts": {...}}``;
  ``set_state(state)`` resumes right after the batch that state was taken at.
  """

  def __init__(
    self,
    file_pattern_or_list,
    *,
    num_epochs: int | None = None,
    with_keys: bool = False,
    **dataset_kwargs,
  ):
    self._files = file_pattern_or_list
    self._kwargs = dataset_kwargs
    self._num_epochs = num_epochs
    self._with_keys = with_keys
    self._epoch = 0
    self._position = 0
    self._base = np.zeros(len(REASONS) + 1, np.int64)  # + unreadable_shard
    self._cur = np.zeros(len(REASONS), np.int64)
    self._it = None
    self._host_files, self._unreadable = [], 0
    self._full_pass, self._delivered = False, 0  # of the epoch being read

  def _start(self):
    ds, self._host_files, self._unreadable = build_epoch_dataset(
      self._files, epoch=self._epoch, start_position=self._position, **self._kwargs
    )
    if self._position == 0:  # counted once per epoch, at its start
      self._base[-1] += self._unreadable
    self._full_pass, self._delivered = self._position == 0, 0
    self._cur[:] = 0
    self._it = ds.as_numpy_iterator()

  def _no_batch_in_a_full_pass(self, last) -> ValueError:
    """The error for an epoch that yielded nothing (else the next one would
    start, and so on forever); ``last``: its final (end-marker) batch."""
    usable = int((last["kind"] != _END).sum())
    counts = dict(zip(REASONS, last["counts"][-1].tolist()), unreadable_shard=self._unreadable)
    bad = ", ".join(f"{n} {r}" for r, n in counts.items() if n) or "no records"
    files = sorted(self._host_files)
    named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    import jax  # only for the process default

    hosts = self._kwargs.get("process_count") or jax.process_count()
    batch = self._kwargs["global_batch_size"] // hosts
    what = (
      "no usable example"
      if not usable
      else f"only {usable} usable examples, fewer than one batch of {batch},"
    )
    return ValueError(
      f"input: {what} in a full pass over {len(files)} file"
      f"{'s' if len(files) != 1 else ''} ({named}): {bad}"
    )

  def __iter__(self):
    return self

  def __next__(self):
    while True:
      if self._num_epochs is not None and self._epoch >= self._num_epochs:
        raise StopIteration
      if self._it is None:
        self._start()
      try:
        b = next(self._it)
      except StopIteration:  # cannot happen: the end marker always comes
        b = None
      end = b is None or bool((b["kind"] == _END).any())
      if end:
        if b is not None:
          if self._full_pass and not self._delivered:
            raise self._no_batch_in_a_full_pass(b)
          self._base[:-1] += b["counts"][-1]
        self._epoch += 1
        self._position = 0
        self._cur[:] = 0
        self._it = None
        continue
      self._position = int(b["idx"][-1]) + 1
      self._cur = b["counts"][-1].copy()
      self._delivered += 1
      out = {"image": b["image"], "text_tokens": b["text_tokens"]}
      if self._with_keys:
        out["key"] = b["key"]
      return out

  def counters(self) -> dict:
    total = self._base.copy()
    total[:-1] += self._cur
    return {**{r: int(total[i]) for i, r in enumerate(REASONS)}, "unreadable_shard": int(total[-1])}

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "position": self._position, "counts": self.counters()}

  def set_state(self, state: dict) -> None:
    self._epoch = int(state["epoch"])
    self._position = int(state["position"])
    counts = state.get("counts", {})
    self._base = np.array(
      [counts.get(r, 0) for r in REASONS] + [counts.get("unreadable_shard", 0)], np.int64
    )
    self._cur = np.zeros(len(REASONS), np.int64)
    self._it = None


def make_train_iterator(
  file_pattern_or_list,
  *,
  global_batch_size: int,
  seed: int,
  image_size: int = 224,
  process_index: int | None = None,
  process_count: int | None = None,
  augment: AugmentConfig | bool | None = True,
  shuffle_buffer: int = 10_000,
  num_epochs: int | None = None,
  with_keys: bool = False,
  **kwargs,
) -> DataIterator:
  """The training loop's entry point; see :class:`DataIterator`."""
  return DataIterator(
    file_pattern_or_list,
    num_epochs=num_epochs,
    with_keys=with_keys,
    global_batch_size=global_batch_size,
    seed=seed,
    image_size=image_size,
    process_index=process_index,
    process_count=process_count,
    augment=augment,
    shuffle_buffer=shuffle_buffer,
    **kwargs,
  )
