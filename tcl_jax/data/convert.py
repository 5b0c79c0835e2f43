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
``--output`` must be empty or hold this same conversion (``convert.json``
records its source, input, shard count and options): shards of another
conversion beside the new ones would be read as one dataset.
Every image is decoded with PIL; bad pairs are skipped and counted. The last
stdout line is ``{"written": n, "skipped": {"<reason>": n, ...}}``.

``--nouns`` also stores each caption's nouns (the ``nouns`` feature, which CoDe's training
batches draw from), found with NLTK exactly as the CoDe authors do (``tcl_jax/data/nouns.py``).
It needs the ``nouns`` extra (NLTK) and NLTK's tokenizer and tagger data (without them: one line
naming the ``python -m nltk.downloader ...`` command, exit status 2).

A mistake in the command (a bad flag, an input that matches no file, a CSV
without rows or not in UTF-8, an output directory that cannot be written or
holds other files) ends in one ``error: ...`` line and exit
status 2 before any work starts.
"""

from __future__ import annotations

import argparse
from collections import Counter
import glob
import io
import json
import math
import os
import re
import sys

from tcl_jax.cli import config_checks
from tcl_jax.cli import config_files
from tcl_jax.data import schema
from tcl_jax.data import sources

# In --output: what the conversion there was made from (so that a rerun resumes only its own).
MANIFEST = "convert.json"

SKIP_REASONS = (
  "corrupt_image",
  "empty_caption",
  "missing_image",
  "missing_caption",
  "unreadable_input",
)


# ----------------------------------------------------------------------------
# Input path patterns
# ----------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


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

  def __init__(self, writer: schema.ShardWriter, tokenize: bool, nouns: bool = False):
    self.writer = writer
    self.skipped = Counter()
    self.tokenize = tokenize
    self.nouns = nouns
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
    nouns = [None] * len(self._pending)
    if self.nouns:
      from tcl_jax.data.nouns import caption_nouns

      nouns = [caption_nouns(p[1]) for p in self._pending]
    for (data, caption, key, url, w, h), tok, nn in zip(self._pending, tokens, nouns):
      self.writer.write(
        schema.make_example(data, caption, key, url=url, width=w, height=h, tokens=tok, nouns=nn)
      )
    self._pending = []


# ----------------------------------------------------------------------------
# Per-shard work (runs in worker processes)
# ----------------------------------------------------------------------------


def _convert_shard(task: dict) -> dict:
  sources.load_tensorflow()
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
  em = _Emitter(writer, task.get("tokenize", False), task.get("nouns", False))
  with writer:
    kind = task["kind"]
    if kind == "webdataset":
      for tar_path in task["inputs"]:
        for sample in sources.webdataset_samples(tar_path, em.skipped):
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
      for sample in sources.tfds_samples(
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
  nouns: bool = False,
) -> list[dict]:
  """One task dict per output shard (picklable, for worker processes)."""
  if kind == "webdataset":
    tars = expand_inputs(inputs)
    local = [t for t in tars if "://" not in t]
    if not tars or (len(local) == len(tars) and not any(os.path.exists(t) for t in tars)):
      raise sources.UsageError(f"no input matches {inputs!r}")
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
    rows = sources.csv_rows(inputs)
    n = num_shards or max(1, math.ceil(len(rows) / 10_000))
    chunks = _split_evenly(rows, n)
  elif kind == "tfds":
    import tensorflow_datasets as tfds

    builder = sources.tfds_builder(inputs, data_dir)
    num = builder.info.splits[split].num_examples
    n = num_shards or max(1, math.ceil(num / 10_000))
    chunks = tfds.even_splits(split, n=n)
  else:
    raise sources.UsageError(f"unknown source {kind!r}")
  problem = config_checks.workdir_problem(output, "--output")
  if problem:
    raise sources.UsageError(problem)
  record = dict(
    source=kind,
    input=_absolute_inputs(kind, inputs),
    num_shards=n,
    split=split,
    all_captions=all_captions,
    tokenize=tokenize,
    data_dir=os.path.abspath(data_dir) if data_dir else None,
  )
  if nouns:  # only then: manifests written before --nouns existed stay resumable
    record["nouns"] = True
  _claim_output(output, record)
  return [
    dict(
      kind=kind,
      inputs=c,
      out=os.path.join(output, schema.shard_name(i, n, out_split)),
      name=inputs,
      data_dir=data_dir,
      all_captions=all_captions,
      tokenize=tokenize,
      nouns=nouns,
    )
    for i, c in enumerate(chunks)
  ]


def _absolute_inputs(kind: str, inputs: str) -> str:
  """The input spec with local paths made absolute: the same command from another directory is
  the same conversion."""
  if kind == "tfds":
    return inputs
  return "::".join(p if "://" in p else os.path.abspath(p) for p in inputs.split("::"))


def _claim_output(output: str, record: dict) -> None:
  """Refuses an --output that holds anything but this same conversion (resuming it is fine), then
  records the conversion in it. Old shards beside new ones (another --num-shards, another input)
  would otherwise be read as one dataset: `train-*.tfrecord` would see them all."""
  path = os.path.join(output, MANIFEST)
  entries = sorted(os.listdir(output))
  if entries:
    try:
      with open(path) as f:
        before = json.load(f)
    except (OSError, ValueError):
      before = None
    if before != record:
      shards = [e for e in entries if e.endswith(schema.SHARD_SUFFIX)]
      if shards:
        what = f"{len(shards)} shard{'s' * (len(shards) > 1)} of"
      else:
        what = f"{len(entries)} file{'s' * (len(entries) > 1)}, e.g. {entries[0]}, of"
      if before is None:
        what += " a conversion it has no record of"
      else:
        diff = [f"{k}={before.get(k)!r}" for k in record if before.get(k) != record[k]]
        what += f" another conversion ({', '.join(diff)})"
      raise sources.UsageError(
        f"--output={output} already holds {what}; readers would see both: give an empty "
        "directory, or delete what is there"
      )
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)


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
  p.add_argument(
    "--nouns",
    action="store_true",
    help="also store each caption's nouns, found with NLTK as CoDe does ('nouns' feature; for "
    "CoDe training)",
  )
  args = p.parse_args(argv)
  config_files.quiet_startup()  # inherited by spawned workers
  if args.nouns:
    from tcl_jax.data import nouns

    problem = nouns.nltk_problem()
    if problem:
      print(f"error: {problem}", file=sys.stderr)
      return 2
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
      nouns=args.nouns,
    )
    summary = run(tasks, args.workers)
  except sources.UsageError as e:
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
