"""Convert image-text pairs into sharded TFRecords (schema: ``schema.py``).

    python -m tcl_jax.data.convert webdataset '/data/cc3m/{00000..00347}.tar' --output DIR
    python -m tcl_jax.data.convert csv pairs.tsv --output DIR --num-shards 64
    python -m tcl_jax.data.convert tfds coco_captions --data-dir ~/tensorflow_datasets --output DIR

Sources:
  webdataset  tar shards as img2dataset writes them: members ``KEY.jpg`` /
              ``KEY.png`` / ``KEY.jpeg`` / ``KEY.webp`` plus ``KEY.txt`` and/or
              ``KEY.json`` (its ``"caption"``). ``.txt`` wins over ``.json``.
              INPUT may hold brace ranges ``{00000..00347}``, lists ``{a,b}``
              and glob characters; several patterns may be joined with ``::``.
  csv         a CSV (``,``) or TSV (``.tsv``/``.tab``: tab) with a header; image
              column ``filepath``/``image``/``path``, caption column
              ``caption``/``title``/``text``; relative paths are relative to the
              CSV's directory.
  tfds        a tensorflow-datasets image-caption dataset already prepared in
              ``--data-dir`` (nothing is downloaded). The first caption of each
              image is used (``--all-captions``: one record per caption).

Each output shard is produced by one task (``--workers`` processes), written
to a temp name and renamed when complete; shards that already exist are
skipped, so an interrupted run resumes by running the same command again.
Every image is decoded with PIL; bad pairs are skipped and counted. The last
stdout line is ``{"written": n, "skipped": {"<reason>": n, ...}}``.

A mistake in the command (a bad flag, an input that matches no file, an output
directory that cannot be written) ends in one ``error: ...`` line and exit
status 2 before any work starts.
"""

from __future__ import annotations

import argparse
from collections import Counter
import csv
import glob
import io
import json
import math
import os
import re
import sys
import tarfile

from tcl_jax import config_checks
from tcl_jax import config_files
from tcl_jax.data import schema

SKIP_REASONS = (
  "corrupt_image",
  "empty_caption",
  "missing_image",
  "missing_caption",
  "unreadable_input",
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "title", "text")
IMAGE_COLUMNS = ("filepath", "image", "path")


# ----------------------------------------------------------------------------
# Input path patterns
# ----------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


class UsageError(SystemExit):
  """A mistake in the command (no matching input, unknown source, missing columns): `main`
  prints it as one line and exits with status 2, the CLIs' usage-error status."""


class _ArgumentParser(argparse.ArgumentParser):
  """argparse's mistakes as one ``error: ...`` line (exit status 2), not a usage block."""

  def error(self, message):
    print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
    sys.exit(2)


def _at_least_one(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def expand_braces(pattern: str) -> list[str]:
  """``a{00..02}b{x,y}`` -> ``a00bx, a00by, a01bx, ...`` (zero padding kept)."""
  m = _BRACE.search(pattern)
  if m is None:
    return [pattern]
  body = m.group(1)
  rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if rng:
    lo, hi = rng.group(1), rng.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    items = body.split(",")
  head, tail = pattern[: m.start()], pattern[m.end() :]
  return [p for it in items for p in expand_braces(head + it + tail)]


def expand_inputs(spec: str) -> list[str]:
  """Brace-expand and glob; keeps non-matching plain names (they count as
  unreadable later, like a missing webdataset shard; ``make_tasks`` refuses a
  spec none of whose names exists)."""
  out = []
  for part in spec.split("::"):
    for p in expand_braces(part):
      if any(c in p for c in "*?["):
        out.extend(sorted(glob.glob(p)))
      else:
        out.append(p)
  return out


# ----------------------------------------------------------------------------
# Validation shared by all sources
# ----------------------------------------------------------------------------


def check_image(data: bytes) -> tuple[bytes, int, int] | None:
  """Fully decode ``data``; return (bytes to store, width, height) or None.

  JPEG/PNG are stored untouched; anything else PIL reads (WebP, GIF, ...) is
  re-encoded to JPEG because the reader only decodes JPEG and PNG.
  """
  from PIL import Image

  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      fmt = img.format
      w, h = img.size
      if w < 1 or h < 1:
        return None
      if fmt in ("JPEG", "PNG"):
        return data, w, h
      buf = io.BytesIO()
      img.convert("RGB").save(buf, format="JPEG", quality=95)
      return buf.getvalue(), w, h
  except Exception:  # PIL raises many types on bad data
    return None


class _Emitter:
  """Validates pairs, writes them, counts skips for one output shard."""

  def __init__(self, writer: schema.ShardWriter, tokenize: bool):
    self.writer = writer
    self.skipped = Counter()
    self.tokenize = tokenize
    self._pending = []  # (image, caption, key, url, w, h), for batched tokenization

  def add(self, image: bytes | None, caption: str | None, key: str, url: str | None = None):
    if image is None:
      self.skipped["missing_image"] += 1
      return
    if caption is None:
      self.skipped["missing_caption"] += 1
      return
    caption = caption.strip()
    if not caption:
      self.skipped["empty_caption"] += 1
      return
    checked = check_image(image)
    if checked is None:
      self.skipped["corrupt_image"] += 1
      return
    data, w, h = checked
    self._pending.append((data, caption, key, url, w, h))
    if len(self._pending) >= 256:
      self.flush()

  def flush(self):
    if not self._pending:
      return
    tokens = [None] * len(self._pending)
    if self.tokenize:
      from tcl_jax.tokenizer import tokenize

      tokens = tokenize([p[1] for p in self._pending])
    for (data, caption, key, url, w, h), tok in zip(self._pending, tokens):
      self.writer.write(
        schema.make_example(data, caption, key, url=url, width=w, height=h, tokens=tok)
      )
    self._pending = []


# ----------------------------------------------------------------------------
# Sources: each yields (image bytes|None, caption|None, key, url|None) and
# reports unreadable inputs through ``emitter.skipped``.
# ----------------------------------------------------------------------------


def _caption_from_json(raw: bytes) -> tuple[str | None, str | None]:
  try:
    meta = json.loads(raw)
  except Exception:
    return None, None
  if not isinstance(meta, dict):
    return None, None
  cap = meta.get("caption")
  return (cap if isinstance(cap, str) else None), meta.get("url")


def _webdataset_samples(tar_path: str, skipped: Counter):
  """Group consecutive tar members by key (webdataset convention: the key is
  the member path up to the first dot of its basename)."""

  def finish(key, parts):
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    caption, url = None, None
    if "json" in parts:
      caption, url = _caption_from_json(parts["json"])
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


def _csv_rows(csv_path: str) -> list[tuple[str, str | None, str]]:
  """All (image path, caption, key) rows of a CSV/TSV."""
  delim = "\t" if csv_path.lower().endswith((".tsv", ".tab")) else ","
  base = os.path.dirname(os.path.abspath(csv_path))
  if not os.path.isfile(csv_path):
    raise UsageError(f"no CSV/TSV file at {csv_path}")
  with open(csv_path, newline="", encoding="utf-8") as f:
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
  return rows


def _load_tensorflow():
  """Imports TensorFlow (in this process: main or a worker) without its load-time notices."""
  if "tensorflow" not in sys.modules:
    with config_files.quiet_native_stderr():
      import tensorflow  # noqa: F401  pylint: disable=unused-import


def _tfds_builder(name: str, data_dir: str | None):
  _load_tensorflow()
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


def _tfds_caption_fields(features) -> tuple[str, str]:
  """Find the image feature and the caption feature of a tfds dataset."""
  import tensorflow_datasets as tfds

  image_key = next((k for k, v in features.items() if isinstance(v, tfds.features.Image)), None)
  cap_key = next((k for k in ("caption", "captions", "text", "title") if k in features), None)
  if image_key is None or cap_key is None:
    raise UsageError(f"tfds dataset has no image/caption features: {list(features)}")
  return image_key, cap_key


def _tfds_samples(name, data_dir, split, all_captions):
  import numpy as np
  import tensorflow_datasets as tfds

  builder = _tfds_builder(name, data_dir)
  image_key, cap_key = _tfds_caption_fields(builder.info.features)
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


# ----------------------------------------------------------------------------
# Per-shard work (runs in worker processes)
# ----------------------------------------------------------------------------


def _convert_shard(task: dict) -> dict:
  _load_tensorflow()
  out = task["out"]
  stats_path = out + schema.STATS_SUFFIX
  if os.path.exists(out):  # finished by an earlier run
    try:
      with open(stats_path) as f:
        st = json.load(f)
    except Exception:
      st = {"written": 0, "skipped": {}}
    st["resumed"] = True
    return st
  writer = schema.ShardWriter(out)
  em = _Emitter(writer, task.get("tokenize", False))
  with writer:
    kind = task["kind"]
    if kind == "webdataset":
      for tar_path in task["inputs"]:
        for sample in _webdataset_samples(tar_path, em.skipped):
          em.add(*sample)
    elif kind == "csv":
      for path, caption, key in task["inputs"]:
        try:
          with open(path, "rb") as f:
            data = f.read()
        except OSError:
          data = None
        em.add(data, caption, key)
    elif kind == "tfds":
      for sample in _tfds_samples(
        task["name"], task["data_dir"], task["inputs"], task.get("all_captions", False)
      ):
        em.add(*sample)
    em.flush()
    st = {"written": writer.count, "skipped": dict(em.skipped)}
    writer.close(st)
  return st


def _split_evenly(items: list, n: int) -> list[list]:
  """Contiguous chunks, sizes differing by at most one."""
  q, r = divmod(len(items), n)
  out, start = [], 0
  for i in range(n):
    end = start + q + (1 if i < r else 0)
    out.append(items[start:end])
    start = end
  return out


def make_tasks(
  kind: str,
  inputs: str,
  output: str,
  num_shards: int | None = None,
  *,
  data_dir: str | None = None,
  split: str = "train",
  all_captions: bool = False,
  tokenize: bool = False,
  out_split: str = "train",
) -> list[dict]:
  """One task dict per output shard (picklable, for worker processes)."""
  if kind == "webdataset":
    tars = expand_inputs(inputs)
    local = [t for t in tars if "://" not in t]
    if not tars or (len(local) == len(tars) and not any(os.path.exists(t) for t in tars)):
      raise UsageError(f"no input matches {inputs!r}")
    missing = [t for t in local if not os.path.exists(t)]
    if missing:
      print(
        f"warning: {len(missing)} of {len(tars)} inputs do not exist (counted as "
        f"unreadable_input), e.g. {missing[0]}",
        file=sys.stderr,
      )
    n = num_shards or len(tars)
    chunks = _split_evenly(tars, n)
  elif kind == "csv":
    rows = _csv_rows(inputs)
    n = num_shards or max(1, math.ceil(len(rows) / 10_000))
    chunks = _split_evenly(rows, n)
  elif kind == "tfds":
    import tensorflow_datasets as tfds

    builder = _tfds_builder(inputs, data_dir)
    num = builder.info.splits[split].num_examples
    n = num_shards or max(1, math.ceil(num / 10_000))
    chunks = tfds.even_splits(split, n=n)
  else:
    raise UsageError(f"unknown source {kind!r}")
  problem = config_checks.workdir_problem(output, "--output")
  if problem:
    raise UsageError(problem)
  return [
    dict(
      kind=kind,
      inputs=c,
      out=os.path.join(output, schema.shard_name(i, n, out_split)),
      name=inputs,
      data_dir=data_dir,
      all_captions=all_captions,
      tokenize=tokenize,
    )
    for i, c in enumerate(chunks)
  ]


def run(tasks: list[dict], workers: int = 1) -> dict:
  """Convert all tasks; returns the summary dict."""
  if workers <= 1 or len(tasks) <= 1:
    results = [_convert_shard(t) for t in tasks]
  else:
    import multiprocessing as mp

    # spawn: TensorFlow is not fork-safe once initialised.
    with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
      results = list(pool.imap_unordered(_convert_shard, tasks))
  total = Counter({r: 0 for r in SKIP_REASONS})
  written = 0
  for r in results:
    written += r.get("written", 0)
    total.update(r.get("skipped", {}))
  return {
    "written": written,
    "skipped": dict(total),
    "resumed_shards": sum(bool(r.get("resumed")) for r in results),
  }


def main(argv=None) -> int:
  p = _ArgumentParser(
    prog="python -m tcl_jax.data.convert",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("source", choices=["webdataset", "csv", "tfds"])
  p.add_argument("input", help="tar pattern / CSV path / tfds dataset name")
  p.add_argument("--output", required=True, help="output directory")
  p.add_argument(
    "--num-shards",
    type=_at_least_one,
    default=None,
    help="output shards (default: one per tar; one per 10k pairs otherwise)",
  )
  p.add_argument(
    "--workers",
    type=_at_least_one,
    default=max(1, (os.cpu_count() or 1)),
    help="worker processes (default: one per CPU)",
  )
  p.add_argument("--data-dir", default=None, help="tfds data_dir")
  p.add_argument("--split", default="train", help="tfds split to read")
  p.add_argument("--all-captions", action="store_true", help="tfds: one record per caption")
  p.add_argument(
    "--tokenize", action="store_true", help="also store CLIP token ids (optional 'tokens' feature)"
  )
  args = p.parse_args(argv)
  config_files.quiet_startup()  # inherited by spawned workers
  try:
    tasks = make_tasks(
      args.source,
      args.input,
      args.output,
      args.num_shards,
      data_dir=args.data_dir,
      split=args.split,
      all_captions=args.all_captions,
      tokenize=args.tokenize,
    )
    summary = run(tasks, args.workers)
  except UsageError as e:
    print(f"error: {e.code}", file=sys.stderr)
    return 2
  print(
    f"{len(tasks)} shards in {args.output} ({summary['resumed_shards']} already done)",
    file=sys.stderr,
  )
  print(json.dumps({"written": summary["written"], "skipped": summary["skipped"]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
