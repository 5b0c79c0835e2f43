"""The inputs `python -m tcl_jax.data.convert` reads: img2dataset webdataset tars, CSV/TSV files of
(image, caption) rows, and local tfds datasets. Each source yields (image bytes | None,
caption | None, key, url | None) and reports unreadable inputs through ``skipped``."""

from __future__ import annotations

from collections import Counter
import csv
import io
import json
import os
import sys
import tarfile

from tcl_jax.cli import config_files


class UsageError(SystemExit):
  """A mistake in the command (no matching input, unknown source, missing columns): `main`
  prints it as one line and exits with status 2, the CLIs' usage-error status."""


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "title", "text")
IMAGE_COLUMNS = ("filepath", "image", "path")


def caption_from_json(raw: bytes) -> tuple[str | None, str | None]:
  try:
    meta = json.loads(raw)
  except Exception:
    return None, None
  if not isinstance(meta, dict):
    return None, None
  cap = meta.get("caption")
  return (cap if isinstance(cap, str) else None), meta.get("url")


def webdataset_samples(tar_path: str, skipped: Counter):
  """Group consecutive tar members by key (webdataset convention: the key is
  the member path up to the first dot of its basename)."""

  def finish(key, parts):
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    caption, url = None, None
    if "json" in parts:
      caption, url = caption_from_json(parts["json"])
    for e in ("txt", "text"):
      if e in parts:
        caption = parts[e].decode("utf-8", errors="replace")
        break
    return image, caption, key, url

  key, parts = None, {}
  try:
    with tarfile.open(tar_path, "r:*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        dirname, base = os.path.split(member.name)
        if "." not in base:
          continue
        stem, ext = base.split(".", 1)
        mkey = os.path.join(dirname, stem) if dirname else stem
        if mkey != key and key is not None:
          yield finish(key, parts)
          parts = {}
        key = mkey
        f = tar.extractfile(member)
        parts[ext.lower()] = f.read() if f is not None else b""
  except (OSError, tarfile.TarError, EOFError):
    # Truncated / unreadable tar: keep what was read before the damage,
    # minus the group that was being read when it broke.
    skipped["unreadable_input"] += 1
    return
  if key is not None:
    yield finish(key, parts)


def csv_rows(csv_path: str) -> list[tuple[str, str | None, str]]:
  """All (image path, caption, key) rows of a CSV/TSV."""
  delim = "\t" if csv_path.lower().endswith((".tsv", ".tab")) else ","
  base = os.path.dirname(os.path.abspath(csv_path))
  if not os.path.isfile(csv_path):
    raise UsageError(f"no CSV/TSV file at {csv_path}")
  with open(csv_path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:  # name the place: a decode error deep in csv says neither
    line = raw.count(b"\n", 0, e.start) + 1
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise UsageError(
      f"{csv_path} line {line}, column {column}: byte 0x{raw[e.start]:02x} is not UTF-8; "
      "save the file as UTF-8"
    ) from None
  with io.StringIO(text, newline="") as f:
    reader = csv.DictReader(f, delimiter=delim)
    cols = reader.fieldnames or []
    icol = next((c for c in IMAGE_COLUMNS if c in cols), None)
    ccol = next((c for c in CAPTION_COLUMNS if c in cols), None)
    if icol is None or ccol is None:
      raise UsageError(
        f"{csv_path} needs an image column {IMAGE_COLUMNS} "
        f"and a caption column {CAPTION_COLUMNS}; has {cols}"
      )
    rows = []
    for i, r in enumerate(reader):
      path = (r.get(icol) or "").strip()
      if path and not os.path.isabs(path):
        path = os.path.join(base, path)
      kcol = r.get("key") or r.get("id")
      rows.append((path, r.get(ccol), kcol or f"{i:09d}"))
  if not rows:
    raise UsageError(f"{csv_path} has a header but no rows: nothing to convert")
  return rows


def load_tensorflow():
  """Imports TensorFlow (in this process: main or a worker) without its load-time notices."""
  if "tensorflow" not in sys.modules:
    with config_files.quiet_native_stderr():
      import tensorflow  # noqa: F401  pylint: disable=unused-import


def tfds_builder(name: str, data_dir: str | None):
  load_tensorflow()
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name, no registry entry, ...
    # Its message lists tfds's whole catalogue (hundreds of lines): the first line only.
    first = (str(e).strip().splitlines() or [""])[0]
    raise UsageError(
      f"tfds dataset {name!r} not found ({type(e).__name__}: {first}); "
      "give a tfds name, prepared in --data-dir"
    ) from None
  if not builder.is_prepared():
    raise UsageError(
      f"tfds dataset {name!r} is not prepared in "
      f"{data_dir or tfds.core.constants.DATA_DIR!r}; prepare it there "
      "first (this tool never downloads)"
    )
  return builder


def tfds_caption_fields(features) -> tuple[str, str]:
  """Find the image feature and the caption feature of a tfds dataset."""
  import tensorflow_datasets as tfds

  image_key = next((k for k, v in features.items() if isinstance(v, tfds.features.Image)), None)
  cap_key = next((k for k in ("caption", "captions", "text", "title") if k in features), None)
  if image_key is None or cap_key is None:
    raise UsageError(f"tfds dataset has no image/caption features: {list(features)}")
  return image_key, cap_key


def tfds_samples(name, data_dir, split, all_captions):
  import numpy as np
  import tensorflow_datasets as tfds

  builder = tfds_builder(name, data_dir)
  image_key, cap_key = tfds_caption_fields(builder.info.features)
  # SkipDecoding keeps the stored JPEG/PNG bytes instead of pixels.
  ds = builder.as_dataset(
    split=split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()}
  )
  for i, ex in enumerate(tfds.as_numpy(ds)):
    caps = ex[cap_key]
    if isinstance(caps, dict):  # e.g. coco_captions: {"text": [...], "id": [...]}
      caps = caps.get("text", next(iter(caps.values())))
    if isinstance(caps, (bytes, str)):
      caps = [caps]
    caps = [
      c.decode("utf-8", errors="replace") if isinstance(c, bytes) else str(c)
      for c in np.asarray(caps).ravel().tolist()
    ]
    if not caps:
      caps = [None]
    if not all_captions:
      caps = caps[:1]
    base_key = None
    for k in ("image/id", "image/filename", "id", "key"):
      if k in ex:
        v = ex[k]
        base_key = v.decode() if isinstance(v, bytes) else str(v)
        break
    base_key = base_key or f"{split}-{i:09d}"
    for j, cap in enumerate(caps):
      key = base_key if len(caps) == 1 else f"{base_key}_{j}"
      yield ex[image_key], cap, key, None
