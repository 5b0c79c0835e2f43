"""The training input: the synthetic data a config asks for, and the input pipeline's iterator."""

import os

from absl import logging
import jax
import ml_collections
import tensorflow as tf

from tcl_jax import sharding
from tcl_jax.data import augment as augment_lib
from tcl_jax.data import in_memory
from tcl_jax.data import input_pipeline
from tcl_jax.data import records
from tcl_jax.data import synthetic
from tcl_jax.data import synthetic_segmentation
from tcl_jax.train import checkpointing


def prepare_synthetic_data(config, workdir: str) -> None:
  """Writes the synthetic train/eval sets into the workdir once (configs/synthetic.py)."""
  syn = config.get("synthetic")
  if not syn:
    return
  root = os.path.join(workdir, "data")
  done = os.path.join(root, "DONE")
  if jax.process_index() == 0 and not os.path.exists(done):
    logging.info("Writing synthetic data under %s", root)
    synthetic.write_synthetic_image_text(
      os.path.join(root, "train"),
      num_examples=syn.num_train_examples,
      image_size=syn.image_size,
      num_shards=syn.num_shards,
      seed=syn.seed,
    )  # with each caption's nouns (CoDe batches; TCL's do not read them)
    for task in [t.strip() for t in config.evals.tasks.split(",") if t.strip()]:
      synthetic_segmentation.write_synthetic_segmentation(
        checkpointing.expand_workdir(config.evals.data_root, workdir),
        task,
        num_images=syn.num_eval_images,
        seed=syn.seed,
      )
    with open(done, "w") as f:
      f.write("ok\n")
  sharding.wait_for_all_processes("synthetic data written")  # minutes on process 0


def num_nouns(config) -> int:
  """N of CoDe batches (`config.input.num_nouns`; 0, the default: TCL batches)."""
  return int(config.input.get("num_nouns", 0) or 0)


def check_nouns_stored(patterns: list[str], n: int, fix: str) -> None:
  """CoDe batches draw from the records' stored nouns: refuses records written without them
  (each pattern's first file's first record), which would all be dropped as too_few_nouns."""
  from tcl_jax.data import schema

  for p in patterns:
    files = records.list_files(p)
    feats = records.first_record_features(files[0]) if files else None
    if feats is not None and schema.NOUNS not in feats:
      raise ValueError(
        f"config.input.num_nouns={n} (CoDe batches) needs records with their captions' nouns, "
        f"and {files[0]} has none: {fix}"
      )


def make_train_iterator(config, workdir: str):
  """The input pipeline's iterator: this host's share of each global batch (in-memory batches
  with `config.input.in_memory`). With `config.input.num_nouns` = N > 0, CoDe batches
  (tcl_jax/data/input_pipeline.py: image, text_tokens, noun_tokens, kg_tokens, word_labels)."""
  inp = config.input
  n = num_nouns(config)
  if inp.get("in_memory"):
    return in_memory.InMemoryIterator(
      global_batch_size=config.batch_size,
      image_size=inp.image_size,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      context_length=config.model.clip.context_length,
      num_nouns=n,
    )
  patterns = [checkpointing.expand_workdir(p, workdir) for p in inp.train_files]
  for p in patterns:  # a wrong path is the likeliest mistake: name it before reading anything
    if not any(tf.io.gfile.exists(f) for f in records.list_files(p)):
      where = "" if "://" in p or os.path.isabs(p) else f" (relative to {os.getcwd()})"
      raise ValueError(f"config.input.train_files: no file matches {p!r}{where}")
  if n:
    fix = "write them with `python -m tcl_jax.data.convert ... --nouns`"
    if config.get("synthetic"):
      fix = f"delete {os.path.join(workdir, 'data')} (written before it stored nouns) and rerun"
    check_nouns_stored(patterns, n, fix)
  kwargs = inp.get("options", ml_collections.ConfigDict()).to_dict()
  if inp.get("augment") is not None:  # AugmentConfig fields over the original's defaults
    kwargs["augment"] = augment_lib.AugmentConfig(
      image_size=inp.image_size, **inp.augment.to_dict()
    )
  return input_pipeline.make_train_iterator(
    patterns,
    global_batch_size=config.batch_size,
    image_size=inp.image_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_nouns=n,
    **kwargs,
  )
