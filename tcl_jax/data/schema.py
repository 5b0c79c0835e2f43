"""TFRecord schema for image-text pairs, and the one writer every producer uses.

Each record is a serialized ``tf.train.Example`` with these features:

==========  ===========  ========  =============================================
feature     type         required  meaning
==========  ===========  ========  =============================================
``image``   bytes        yes       the encoded image file, JPEG or PNG, as-is
                                   (not re-encoded when the source already is
                                   JPEG/PNG; other formats are re-encoded to
                                   JPEG by the converter)
``caption`` bytes        yes       UTF-8 caption text
``key``     bytes        yes       a unique id for the pair (e.g. img2dataset's
                                   ``000000123``); used for de-duplication and
                                   the per-host disjointness tests
``url``     bytes        no        source URL if known
``width``   int64        no        decoded image width in pixels
``height``  int64        no        decoded image height in pixels
``tokens``  int64 x 77   no        CLIP BPE ids of ``caption``; only written by
                                   ``convert --tokenize``.  The input pipeline
                                   tokenizes captions itself by default (see
                                   ``input_pipeline.py`` for why), so this is
                                   an optional cache.
``nouns``   bytes x n    no        UTF-8 nouns of ``caption``, sorted, unique
                                   (n >= 0); CoDe's training batches draw from
                                   them. Written by ``convert --nouns`` (NLTK,
                                   as the CoDe authors: ``nouns.py``) and by the
                                   synthetic world (the objects it names). An
                                   empty list means "looked, found none";
                                   records without the feature predate it.
==========  ===========  ========  =============================================

Shards are named ``{split}-{index:05d}-of-{count:05d}.tfrecord`` (uncompressed).
A shard is first written as ``<name>.tmp-<pid>`` and atomically renamed when
complete, so a file with the final name is always whole; a JSON sidecar
``<name>.stats.json`` records what went into it (written / skipped counts).
"""

from __future__ import annotations

import json
import os

IMAGE = "image"
CAPTION = "caption"
KEY = "key"
URL = "url"
WIDTH = "width"
HEIGHT = "height"
TOKENS = "tokens"
NOUNS = "nouns"

SHARD_SUFFIX = ".tfrecord"
STATS_SUFFIX = ".stats.json"


def shard_name(index: int, count: int, split: str = "train") -> str:
  return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def parse_spec(
  with_tokens: bool = False, context_length: int = 77, with_nouns: bool = False
) -> dict:
  """Feature spec for ``tf.io.parse_single_example``.

  Missing required features parse to empty strings rather than failing, so
  that the reader can count them ("missing_image" / "empty_caption") instead
  of losing the whole record to a parse error. ``with_nouns``: ``nouns`` as a
  SparseTensor (no feature: no nouns).
  """
  import tensorflow as tf

  spec = {
    IMAGE: tf.io.FixedLenFeature([], tf.string, default_value=""),
    CAPTION: tf.io.FixedLenFeature([], tf.string, default_value=""),
    KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
  }
  if with_tokens:
    spec[TOKENS] = tf.io.FixedLenFeature(
      [context_length], tf.int64, default_value=[0] * context_length
    )
  if with_nouns:
    spec[NOUNS] = tf.io.VarLenFeature(tf.string)
  return spec


def make_example(
  image: bytes,
  caption: str,
  key: str,
  *,
  url: str | None = None,
  width: int | None = None,
  height: int | None = None,
  tokens=None,
  nouns=None,
) -> bytes:
  """Serialize one image-text pair to ``tf.train.Example`` bytes (``nouns``: a list of str,
  stored sorted and unique; an empty list is stored too)."""
  import tensorflow as tf

  def _bytes(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

  def _ints(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

  feats = {
    IMAGE: _bytes(image),
    CAPTION: _bytes(caption.encode("utf-8")),
    KEY: _bytes(key.encode("utf-8")),
  }
  if url:
    feats[URL] = _bytes(url.encode("utf-8"))
  if width is not None:
    feats[WIDTH] = _ints([int(width)])
  if height is not None:
    feats[HEIGHT] = _ints([int(height)])
  if tokens is not None:
    feats[TOKENS] = _ints(int(t) for t in tokens)
  if nouns is not None:
    if isinstance(nouns, (str, bytes)):
      raise TypeError("nouns must be a list of str, not one string")
    values = [n.encode("utf-8") for n in sorted(set(nouns))]
    feats[NOUNS] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


class ShardWriter:
  """Writes one shard to a temp name; ``close()`` renames it into place.

  Use as a context manager: on an exception the temp file is removed and the
  final name never appears, which is what makes conversion resumable.
  """

  def __init__(self, path: str):
    import tensorflow as tf

    self.path = path
    self.tmp_path = f"{path}.tmp-{os.getpid()}"
    self._writer = tf.io.TFRecordWriter(self.tmp_path)
    self.count = 0
    self._done = False

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self.count += 1

  def close(self, stats: dict | None = None) -> None:
    if self._done:
      return
    self._done = True
    self._writer.close()
    # The sidecar goes first: a final-named shard then always has one.
    if stats is not None:
      with open(self.path + STATS_SUFFIX, "w") as f:
        json.dump(stats, f)
    os.replace(self.tmp_path, self.path)

  def abort(self) -> None:
    if self._done:
      return
    self._done = True
    self._writer.close()
    if os.path.exists(self.tmp_path):
      os.remove(self.tmp_path)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      self.abort()
    else:
      self.close()
    return False
