"""Training batches made in memory, for runs that must need no data files (configs/tcl.py:smoke,
or any config with --config.input.in_memory=True): the recipe's shapes and batch, no TFRecords.

Images are standard-normal noise (already "normalised"); captions are real sentences through the
real CLIP tokenizer. Batch i is a function of (seed, process, i) only, so the iterator state is
one integer and a resumed run gets the same batches as an uninterrupted one.
"""

import numpy as np

from tcl_jax import tokenizer

_CAPTIONS = tuple(
  f"a photo of a {c} {s}"
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
  ):
    if global_batch_size % process_count:
      raise ValueError(
        f"global batch {global_batch_size} does not divide over {process_count} processes"
      )
    self._b = global_batch_size // process_count
    self._size = image_size
    self._seed, self._process = seed, process_index
    self._tokens = tokenizer.tokenize(_CAPTIONS, context_length)
    self._i = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([self._seed, self._process, self._i])
    self._i += 1
    image = rng.standard_normal((self._b, self._size, self._size, 3), np.float32)
    rows = rng.integers(len(_CAPTIONS), size=self._b)
    return {"image": image, "text_tokens": self._tokens[rows]}

  def get_state(self) -> dict:
    return {"batches": self._i}

  def set_state(self, state: dict) -> None:
    self._i = int(state["batches"])
