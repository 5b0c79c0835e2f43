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
* ``unreadable_shard``: a listed file that cannot be stat'ed at all;
* ``too_few_nouns`` (CoDe batches only, ``num_nouns`` > 0): a record with fewer stored nouns
  than ``num_nouns`` (schema ``nouns``; none: a record written without them). Counted only, not
  named in the log: CoDe's authors skip such captions silently, they are not bad data.

The counts travel with each example through ``scan`` ops, so ``counters()``
reflects exactly what lies before the last delivered batch, and survives
``get_state``/``set_state``.

Bad data is also named: a WARNING line per bad shard or record (reason, file,
and the record's key, or its number in the file when it has no parseable key),
each once per process and at most ``records.BadDataLog.burst`` lines a minute (see
:class:`records.BadDataLog`). Records dropped by ``ignore_errors`` leave only a gap in
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

CoDe batches (``num_nouns`` = N > 0; tcl_jax/data/nouns.py)::

    {"image", "text_tokens",
     "noun_tokens": i32 [b, N, 60],   # the N drawn nouns, the prompter's tokens
     "kg_tokens":   i32 [b, N, 77],   # each drawn noun in one of the 80 ImageNet templates
     "word_labels": i32 [b, 77]}      # -1 / 0 (any noun) / i + 1 (drawn noun i) per token

The N nouns (a uniform random permutation of the record's stored nouns, first N) and their
templates are drawn from the example's stateless seed, like its augmentation (so a resumed run
draws the same); records with fewer than N nouns are dropped and counted (``too_few_nouns``).
TCL batches (N = 0) are exactly what they were: nouns are neither parsed nor drawn.
"""

from __future__ import annotations

import gc

import numpy as np
import tensorflow as tf

from tcl_jax.data import records
from tcl_jax.data.augment import AugmentConfig


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
  num_nouns: int = 0,
) -> tuple[tf.data.Dataset, list[str], int]:
  """One epoch of per-host training batches as a ``tf.data.Dataset``.

  ``augment``: True / an ``AugmentConfig`` -> training augmentation (the
  config's ``image_size`` is replaced by ``image_size``); False / None ->
  deterministic short-side resize + centre crop (for checks and eval-like use).

  Elements are dicts with ``image`` f32 [b, S, S, 3] (ImageNet-normalised),
  ``text_tokens`` i32 [b, 77], with ``num_nouns`` > 0 CoDe's keys (module doc) and, with
  ``with_metadata``, ``key``, ``idx``,
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
  if isinstance(num_nouns, bool) or int(num_nouns) != num_nouns or num_nouns < 0:
    raise ValueError(f"num_nouns must be a whole number >= 0, got {num_nouns!r}")
  num_nouns = int(num_nouns)
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

  files = records.host_files(records.list_files(file_pattern_or_list), process_index, process_count)
  rng = np.random.default_rng([seed, epoch, process_index])
  files = [files[i] for i in rng.permutation(len(files))]
  sizes = [records.file_size(f) for f in files]
  readable = [(f, s) for f, s in zip(files, sizes) if s is not None]
  for f, s in zip(files, sizes):
    if s is None:
      records.BAD_DATA_LOG.report("unreadable_shard", f)
  shuffle_seed = int(rng.integers(0, 2**31 - 1))
  paths = tf.constant([f for f, _ in readable] or [""], tf.string)
  lens = tf.constant([s for _, s in readable] or [0], tf.int64)

  ds = records.record_stream(
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
  names_by_idx, names_by_ordinal = records.table(), records.table()
  ds = records.parse_and_check(
    ds,
    names_by_idx,
    start_position=start_position,
    par=par,
    tokens_from_record=tokens_from_record,
    context_length=context_length,
    num_nouns=num_nouns,
  )
  base_seed = tf.random.experimental.stateless_fold_in(
    tf.constant([seed, epoch], tf.int64), process_index
  )

  ds = records.decode_stage(
    ds,
    names_by_ordinal,
    base_seed,
    augment=augment,
    image_size=image_size,
    par=par,
    tokens_from_record=tokens_from_record,
    num_nouns=num_nouns,
  )
  ds = records.batch_stage(
    ds,
    batch,
    augment=augment,
    tokens_from_record=tokens_from_record,
    context_length=context_length,
    with_metadata=with_metadata,
    prefetch=prefetch,
    num_nouns=num_nouns,
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
  (CoDe's keys too with ``num_nouns`` > 0; plus ``"key"``: object array of bytes, if
  ``with_keys``).
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
    self._base = np.zeros(len(records.REASONS) + 1, np.int64)  # + unreadable_shard
    self._cur = np.zeros(len(records.REASONS), np.int64)
    self._it = None
    self._host_files, self._unreadable = [], 0
    self._full_pass, self._delivered = False, 0  # of the epoch being read
    self._code_keys = records.CODE_KEYS if dataset_kwargs.get("num_nouns") else ()

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
    usable = int((last["kind"] != records.END).sum())
    counts = dict(
      zip(records.REASONS, last["counts"][-1].tolist()), unreadable_shard=self._unreadable
    )
    bad = ", ".join(f"{n} {r}" for r, n in counts.items() if n) or "no records"
    if counts["too_few_nouns"]:
      n = self._kwargs["num_nouns"]
      bad += f" (CoDe batches take records with >= {n} stored nouns: convert --nouns)"
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
      end = b is None or bool((b["kind"] == records.END).any())
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
      out = {k: b[k] for k in ("image", "text_tokens") + self._code_keys}
      if self._with_keys:
        out["key"] = b["key"]
      return out

  def close(self) -> None:
    """Stops the pipeline's threads now, while Python can still serve them: they tokenize
    through tf.numpy_function, so an iterator left to interpreter exit hangs it (its destructor
    holds the GIL while it waits for threads that wait for the GIL) or aborts it (a thread that
    re-enters Python during finalization: `terminate called after throwing an instance of ''`).
    A later ``next()`` restarts the pipeline at the same position."""
    self._it = None
    gc.collect()  # the iterator's deleter runs now, with the GIL released while it waits

  def counters(self) -> dict:
    """Dropped data by reason (``too_few_nouns`` only for CoDe batches: TCL's are unchanged)."""
    total = self._base.copy()
    total[:-1] += self._cur
    out = {
      **{r: int(total[i]) for i, r in enumerate(records.REASONS)},
      "unreadable_shard": int(total[-1]),
    }
    if not self._code_keys:
      del out["too_few_nouns"]
    return out

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "position": self._position, "counts": self.counters()}

  def set_state(self, state: dict) -> None:
    self._epoch = int(state["epoch"])
    self._position = int(state["position"])
    counts = state.get("counts", {})
    self._base = np.array(
      [counts.get(r, 0) for r in records.REASONS] + [counts.get("unreadable_shard", 0)], np.int64
    )
    self._cur = np.zeros(len(records.REASONS), np.int64)
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
