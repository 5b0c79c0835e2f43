"""Training batches made in memory, for runs that must need no data files (configs/tcl.py:smoke,
or any config with --config.input.in_memory=True): the recipe's shapes and batch, no TFRecords.

Images are standard-normal noise (already "normalised"); captions are real sentences through the
real CLIP tokenizer. Batch i is a function of (seed, process, i) only, so the iterator state is
one integer and a resumed run gets the same batches as an uninterrupted one.

With ``num_nouns`` = N > 0: CoDe batches (tcl_jax/data/input_pipeline.py), N nouns drawn per
caption from ``NOUNS`` (what CoDe's NLTK rule finds in each caption, tcl_jax/data/nouns.py).
"""

import numpy as np

from tcl_jax import tokenizer
from tcl_jax.data import nouns as nouns_lib

_CAPTIONS = tuple(
  f"a photo of a {c} {s}"
  for c in ("red", "green", "blue", "white")
  for s in ("dog", "car", "tree", "house")
)
# nouns.caption_nouns of each caption (NLTK 3.10's tagger; it takes "blue" for a noun twice).
NOUNS = tuple(
  sorted({"photo", s} | ({"blue"} if (c, s) in {("blue", "car"), ("blue", "house")} else set()))
  for c in ("red", "green", "blue", "white")
  for s in ("dog", "car", "tree", "house")
)


class InMemoryIterator:
  """Endless per-host batches: {"image": float32 [b, S, S, 3], "text_tokens": int32 [b, L]} with
  b = global_batch_size // process_count."""

  def __init__(
    self,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    context_length: int = 77,
    num_nouns: int = 0,
  ):
    if global_batch_size % process_count:
      raise ValueError(
        f"global batch {global_batch_size} does not divide over {process_count} processes"
      )
    self._b = global_batch_size // process_count
    self._size = image_size
    self._seed, self._process = seed, process_index
    self._tokens = tokenizer.tokenize(_CAPTIONS, context_length)
    if num_nouns > min(map(len, NOUNS)):
      raise ValueError(
        f"in-memory batches have {min(map(len, NOUNS))} nouns per caption, fewer than "
        f"num_nouns={num_nouns}"
      )
    self._num_nouns = num_nouns
    self._i = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([self._seed, self._process, self._i])
    self._i += 1
    image = rng.standard_normal((self._b, self._size, self._size, 3), np.float32)
    rows = rng.integers(len(_CAPTIONS), size=self._b)
    batch = {"image": image, "text_tokens": self._tokens[rows]}
    if self._num_nouns:  # drawn after the TCL batch's draws, which stay as they were
      n = self._num_nouns
      drawn = [[NOUNS[r][j] for j in rng.permutation(len(NOUNS[r]))[:n]] for r in rows]
      templates = rng.integers(len(nouns_lib.full_imagenet_templates()), size=(self._b, n))
      all_nouns = [NOUNS[r] for r in rows]
      batch.update(nouns_lib.code_text(batch["text_tokens"], drawn, templates, all_nouns))
    return batch

  def get_state(self) -> dict:
    return {"batches": self._i}

  def set_state(self, state: dict) -> None:
    self._i = int(state["batches"])
