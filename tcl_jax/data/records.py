"""The stages of one host's epoch of training records (tcl_jax.data.input_pipeline composes them):
this host's files, the raw record stream with end-of-file and end-of-epoch markers, parsing and
the bad-data accounting (counted per reason, named in the log), decoding with augmentation, and
per-host batches with tokens (and, for CoDe, the drawn nouns' tokens and the caption's word
labels)."""

from __future__ import annotations

import functools
import glob as _glob
import threading
import time

from absl import logging
import numpy as np
import tensorflow as tf

from tcl_jax.data import schema
from tcl_jax.data.augment import decode_center
from tcl_jax.data.augment import finish_batch
from tcl_jax.data.augment import train_augment_pixels

REASONS = (
  "bad_record",
  "empty_caption",
  "missing_image",
  "corrupt_image",
  "bad_shard",
  "too_few_nouns",  # CoDe batches only (num_nouns > 0); counted, never named (not bad data)
)
R = {r: i for i, r in enumerate(REASONS)}
# Mixed into an example's seed for its noun and template draws (the augmentation's draws split
# the example's seed itself, so these never share a stream with them).
NOUN_DRAW_SALT = 0x6E6F756E

# element kinds in the raw stream
REC, EOF_OK, EOF_BAD, END = 0, 1, 2, 3
TFRECORD_OVERHEAD = 16  # length (8) + length crc (4) + data crc (4)


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


def report_bad(reasons, names):
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


def log_bad_if(pred, reasons_and_names):
  """In a ``scan`` step: reports ``reasons_and_names()`` (built only where ``pred``
  holds, so that clean elements run none of it); returns 0 for a control
  dependency of what the step outputs."""
  return tf.cond(
    pred,
    lambda: tf.numpy_function(report_bad, list(reasons_and_names()), tf.int64, stateful=True),
    lambda: tf.constant(0, tf.int64),
  )


def table():
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


def first_record_features(path: str) -> set[str] | None:
  """The feature names of ``path``'s first record (None: no readable, parseable first record)."""
  try:
    for rec in tf.data.TFRecordDataset(path).take(1):
      return set(tf.train.Example.FromString(rec.numpy()).features.feature)
  except Exception:  # unreadable, truncated, not an Example: the pipeline counts those itself
    return None
  return None


def file_size(path: str) -> int | None:
  try:
    return int(tf.io.gfile.stat(path).length)
  except Exception:  # missing, permission, ...
    return None


def read_file(path, size):
  """Records of one file followed by a sentinel saying whether all of it was read:
  (record, kind, name); a record's name is its path + NUL + its number in the file."""
  recs = tf.data.TFRecordDataset(path).ignore_errors()
  recs = recs.map(lambda r: (r, tf.constant(REC)))
  eof = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(EOF_OK)))

  def account(state, elem):
    total, n_recs = state
    rec, kind = elem
    is_rec = tf.equal(kind, REC)
    n = tf.cast(tf.strings.length(rec), tf.int64) + TFRECORD_OVERHEAD
    total = total + tf.where(is_rec, n, tf.constant(0, tf.int64))
    kind = tf.where(is_rec, kind, tf.where(tf.equal(total, size), EOF_OK, EOF_BAD))
    name = tf.where(is_rec, tf.strings.join([path, tf.strings.as_string(n_recs)], "\0"), path)
    return (total, n_recs + tf.cast(is_rec, tf.int64)), (rec, kind, name)

  zero = tf.constant(0, tf.int64)
  return recs.concatenate(eof).scan((zero, zero), account)


def record_stream(
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
    read_file,
    cycle_length=max(1, min(cycle_length, num_files)),
    block_length=1,
    num_parallel_calls=par,
    deterministic=True,
  )
  if shuffle_buffer > 1:
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  # The end marker (index = number of raw elements) flushes the counters.
  ds = ds.concatenate(
    tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(END), tf.constant(b"")))
  )
  ds = ds.enumerate()
  if start_position:
    ds = ds.skip(start_position)

  return ds


def parse_and_check(
  ds,
  names_by_idx,
  *,
  start_position: int,
  par,
  tokens_from_record: bool,
  context_length: int,
  num_nouns: int = 0,
) -> tf.data.Dataset:
  """Parsed examples; records that fail to parse, lack an image or a caption, or come from a
  bad shard are counted (``counts``), named in the log and dropped. With ``num_nouns``, records
  with fewer nouns are counted (``too_few_nouns``) and dropped, unnamed: CoDe's authors skip them
  silently, and they are ordinary captions, not bad data."""
  spec = schema.parse_spec(
    with_tokens=tokens_from_record, context_length=context_length, with_nouns=num_nouns > 0
  )

  def parse(idx, elem):
    rec, kind, name = elem
    with tf.control_dependencies([names_by_idx.insert(idx[None], name[None])]):
      # Non-records (sentinels) parse as an empty Example: every feature default.
      ex = tf.io.parse_single_example(tf.where(tf.equal(kind, REC), rec, b""), spec)
    if num_nouns:
      ex[schema.NOUNS] = tf.sparse.to_dense(ex[schema.NOUNS])
    ex["idx"] = idx
    ex["kind"] = kind
    ex["name"] = name
    return ex

  ds = ds.map(parse, num_parallel_calls=par, deterministic=True).ignore_errors()

  def check(state, ex):
    last, counts, ordinal = state
    rec = tf.equal(ex["kind"], REC)
    no_image = rec & tf.equal(tf.strings.length(ex[schema.IMAGE]), 0)
    no_caption = (
      rec & ~no_image & tf.equal(tf.strings.length(tf.strings.strip(ex[schema.CAPTION])), 0)
    )
    bad_shard = tf.equal(ex["kind"], EOF_BAD)
    few = tf.constant(False)
    if num_nouns:
      few = rec & ~no_image & ~no_caption & (tf.size(ex[schema.NOUNS]) < num_nouns)
    lost = ex["idx"] - last - 1  # records lost to parse errors
    add = tf.stack(
      [
        lost,
        tf.cast(no_caption, tf.int64),
        tf.cast(no_image, tf.int64),
        tf.constant(0, tf.int64),
        tf.cast(bad_shard, tf.int64),
        tf.cast(few, tf.int64),
      ]
    )

    def bad():
      own = tf.stack([no_caption, no_image, bad_shard])
      reasons = tf.concat(
        [
          tf.fill([lost], R["bad_record"]),
          tf.boolean_mask([R["empty_caption"], R["missing_image"], R["bad_shard"]], own),
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

    logged = log_bad_if((lost > 0) | no_caption | no_image | bad_shard, bad)
    with tf.control_dependencies([logged]):  # names up to here are not needed any more
      forget = names_by_idx.remove(tf.range(last + 1, ex["idx"] + 1))
    with tf.control_dependencies([forget]):
      counts = counts + add
    valid = (rec & ~no_image & ~no_caption & ~few) | tf.equal(ex["kind"], END)
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


def draw_nouns(nouns, seed, num_nouns: int, num_templates: int):
  """(drawn, templates): the first ``num_nouns`` of a uniform random permutation of ``nouns``
  (str [n]; padded with b"" when n < num_nouns), and a template index in [0, num_templates) per
  drawn noun, both a function of ``seed`` only (CoDe's random.shuffle and random.choice)."""
  s = tf.random.experimental.stateless_split(
    tf.random.experimental.stateless_fold_in(seed, NOUN_DRAW_SALT), 2
  )
  order = tf.argsort(tf.random.stateless_uniform(tf.shape(nouns)[:1], s[0]), stable=True)
  drawn = tf.concat([tf.gather(nouns, order), tf.fill([num_nouns], b"")], 0)[:num_nouns]
  drawn = tf.ensure_shape(drawn, [num_nouns])  # static: batched dense, not ragged
  templates = tf.random.stateless_uniform(
    [num_nouns], s[1], minval=0, maxval=num_templates, dtype=tf.int32
  )
  return drawn, templates


def decode_stage(
  ds,
  names_by_ordinal,
  base_seed,
  *,
  augment,
  image_size: int,
  par,
  tokens_from_record: bool,
  num_nouns: int = 0,
  num_templates: int = 80,
) -> tf.data.Dataset:
  """Decoded (and, with ``augment``, augmented) images at pixel scale; images that fail to
  decode are counted as ``corrupt_image`` and named. With ``num_nouns``: each example's nouns,
  its drawn nouns and their templates (:func:`draw_nouns`, from the example's seed)."""

  def decode(ex):
    is_end = tf.equal(ex["kind"], END)
    keep_name = names_by_ordinal.insert(
      ex["ordinal"][None], tf.strings.join([ex["name"], ex[schema.KEY]], "\0")[None]
    )
    ex_seed = tf.random.experimental.stateless_fold_in(base_seed, ex["idx"])
    if augment:
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
    if num_nouns:
      out["nouns"] = ex[schema.NOUNS]
      out["drawn"], out["templates"] = draw_nouns(
        ex[schema.NOUNS], ex_seed, num_nouns, num_templates
      )
    return out

  ds = ds.map(decode, num_parallel_calls=par, deterministic=True).ignore_errors()

  def count_decode_failures(state, ex):
    last, failed = state
    lost = ex["ordinal"] - last - 1
    logged = log_bad_if(
      lost > 0,
      lambda: (
        tf.fill([lost], R["corrupt_image"]),
        names_by_ordinal.lookup(tf.range(last + 1, ex["ordinal"])),
      ),
    )
    with tf.control_dependencies([logged]):
      forget = names_by_ordinal.remove(tf.range(last + 1, ex["ordinal"] + 1))
    with tf.control_dependencies([forget]):
      failed = failed + lost
    out = {k: v for k, v in ex.items() if k != "ordinal"}
    out["counts"] = (
      ex["counts"] + tf.one_hot(R["corrupt_image"], len(REASONS), dtype=tf.int64) * failed
    )
    return (ex["ordinal"], failed), out

  ds = ds.scan((tf.constant(-1, tf.int64), tf.constant(0, tf.int64)), count_decode_failures)
  return ds


# What a CoDe batch has besides "image" and "text_tokens" (tcl_jax/data/nouns.py: code_text).
CODE_KEYS = ("noun_tokens", "kg_tokens", "word_labels")


def _code_text(text_tokens, drawn, templates, flat_nouns, splits):
  from tcl_jax.data import nouns

  def strs(a):
    return [x.decode("utf-8", errors="replace") for x in a.tolist()]

  flat = strs(flat_nouns)
  all_nouns = [flat[i:j] for i, j in zip(splits[:-1].tolist(), splits[1:].tolist())]
  out = nouns.code_text(text_tokens, [strs(r) for r in drawn], templates, all_nouns)
  return tuple(out[k] for k in CODE_KEYS)


def add_code_text(b, *, num_nouns: int):
  """A batch's CoDe keys from its tokens, drawn nouns, templates and all its nouns."""
  from tcl_jax.data import nouns

  ragged = b["nouns"]
  outs = tf.numpy_function(
    _code_text,
    [b["text_tokens"], b["drawn"], b["templates"], ragged.flat_values, ragged.row_splits],
    [tf.int32] * len(CODE_KEYS),
    stateful=False,
  )
  length = b["text_tokens"].shape[-1]
  shapes = {
    "noun_tokens": [None, num_nouns, nouns.NOUN_CONTEXT_LENGTH - 1],
    "kg_tokens": [None, num_nouns, nouns.CONTEXT_LENGTH],
    "word_labels": [None, length],
  }
  return dict(b, **{k: tf.ensure_shape(v, shapes[k]) for k, v in zip(CODE_KEYS, outs)})


def batch_stage(
  ds,
  batch: int,
  *,
  augment,
  tokens_from_record: bool,
  context_length: int,
  with_metadata: bool,
  prefetch: int,
  num_nouns: int = 0,
) -> tf.data.Dataset:
  """Per-host batches: flipped and normalised, tokenized, metadata kept or dropped. With
  ``num_nouns``, CoDe's keys too (``CODE_KEYS``; tcl_jax/data/nouns.py: code_text)."""
  # The end marker may land in a full-size batch; DataIterator drops that
  # batch (it holds < batch real examples), so no drop_remainder here.
  if num_nouns:
    ds = ds.ragged_batch(batch, drop_remainder=False)  # "nouns" differ in length; the rest dense
  else:
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
  if num_nouns:
    ds = ds.map(functools.partial(add_code_text, num_nouns=num_nouns))
  drop = {"caption", "nouns", "drawn", "templates"}
  ds = ds.map(lambda b: {k: v for k, v in b.items() if k not in drop})
  if not with_metadata:
    # plain use: drop the final batch (remainder + end marker) and the extras
    keys = ("image", "text_tokens") + (CODE_KEYS if num_nouns else ())
    ds = ds.filter(lambda b: tf.reduce_all(tf.not_equal(b["kind"], END)))
    ds = ds.map(lambda b: {k: b[k] for k in keys})
  ds = ds.prefetch(prefetch)

  return ds
