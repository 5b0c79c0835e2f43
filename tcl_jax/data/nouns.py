"""Nouns of captions, and the text side of a CoDe training batch.

Nouns: CoDe (CVPR 2024) finds them with NLTK, as its datasets/noun_parser.py
``WordAugTokenizeWrapper(word_type="noun")`` does: ``nltk.word_tokenize``, ``nltk.pos_tag``, keep
the words tagged NN / NNP / NNS / NNPS, dedupe, then drop the single lowercase letters a-z and
"<", ">" (only those: "A" stays). ``python -m tcl_jax.data.convert ... --nouns`` runs this once
per caption and stores the result, sorted, in the records (``schema.NOUNS``); NLTK is imported
here only, and only by :func:`caption_nouns` / :func:`nltk_problem` (the ``nouns`` extra).

CoDe batch text (:func:`code_text`), from a caption's tokens, its stored nouns and the N nouns
drawn for it (the input pipeline draws them, and a prompt template per noun, from the example's
stateless seed):

* ``noun_tokens`` [N, 60]: ``tokenize(noun, 61)[1:]``, the prompter's tokens (77 minus its 16
  context vectors; SOT dropped: models/tcl/prompter.py PromptLearner.forward);
* ``kg_tokens`` [N, 77]: ``tokenize(template.format(noun))`` with one of the 80
  ``full_imagenet_templates`` (noun_decomposition.py get_kg_embedding's random.choice);
* ``word_labels`` [77]: datasets/builder.py TextPreprocess.get_noun_masks: -1 everywhere, 0 at
  every run of the caption's tokens equal to the BPE ids of any of the record's nouns, then i + 1
  at the runs of drawn noun i (later nouns overwrite earlier ones).
"""

from __future__ import annotations

import functools

import numpy as np

from tcl_jax import tokenizer

NOUN_TAGS = ("NN", "NNP", "NNS", "NNPS")
NOT_NOUNS = frozenset("abcdefghijklmnopqrstuvwxyz<>")
# The prompter's token length + 1 (SOT, dropped): 77 minus CoDe's 16 learned context vectors.
NOUN_CONTEXT_LENGTH = 61
CONTEXT_LENGTH = 77
# NLTK's data that word_tokenize + pos_tag load, by NLTK version (3.9 replaced the pickles).
NLTK_DATA = {
  "new": (("punkt_tab", "tokenizers/punkt_tab/english/"),
          ("averaged_perceptron_tagger_eng", "taggers/averaged_perceptron_tagger_eng/")),
  "old": (("punkt", "tokenizers/punkt/english.pickle"),
          ("averaged_perceptron_tagger",
           "taggers/averaged_perceptron_tagger/averaged_perceptron_tagger.pickle")),
}  # fmt: skip
NLTK_FIX = 'pip install -e ".[nouns]"'


def nouns_from_tagged(tagged) -> list[str]:
  """The authors' rule on ``nltk.pos_tag``'s output ((word, tag) pairs): sorted unique nouns."""
  return sorted({word for word, tag in tagged if tag in NOUN_TAGS} - NOT_NOUNS)


def caption_nouns(caption: str) -> list[str]:
  """The nouns of one caption (NLTK; see the module doc). LookupError without NLTK's data."""
  import nltk

  words = nltk.word_tokenize(caption)
  return nouns_from_tagged(nltk.pos_tag(words)) if words else []


def _nltk_version(nltk) -> tuple[int, ...]:
  parts = []
  for p in str(getattr(nltk, "__version__", "0")).split(".")[:2]:
    digits = "".join(c for c in p if c.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


def nltk_problem() -> str | None:
  """Why :func:`caption_nouns` cannot run here, in one line naming the fix (None: it can)."""
  try:
    import nltk
  except ImportError as e:
    if getattr(e, "name", None) == "nltk":
      return f"--nouns needs NLTK, which the nouns extra installs: {NLTK_FIX}"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"NLTK is installed but cannot be imported ({first}); reinstall it: {NLTK_FIX}"
  try:
    caption_nouns("a dog on a mat")
  except LookupError:
    pass
  else:
    return None
  names = NLTK_DATA["new" if _nltk_version(nltk) >= (3, 9) else "old"]
  missing = []
  for name, resource in names:
    try:
      nltk.data.find(resource)
    except LookupError:
      missing.append(name)
  missing = missing or [n for n, _ in names]  # found but unloadable: fetch both again
  return (
    f"--nouns needs NLTK's {' and '.join(missing)} data, not found here: "
    f"python -m nltk.downloader {' '.join(missing)}"
  )


@functools.lru_cache(maxsize=200_000)
def _bpe(noun: str) -> tuple[int, ...]:
  return tuple(tokenizer.get_tokenizer(CONTEXT_LENGTH).bpe_ids(noun))


def _mark(tokens: np.ndarray, ids: tuple[int, ...]) -> np.ndarray:
  """[len(tokens)] bool: the positions of every run of ``tokens`` equal to ``ids``."""
  n, k = len(tokens), len(ids)
  hit = np.zeros(n, bool)
  if k == 0 or k > n:  # the original's loop finds nothing then either
    return hit
  starts = np.ones(n - k + 1, bool)  # where a run starts
  for j, t in enumerate(ids):
    starts &= tokens[j : n - k + 1 + j] == t
  for j in range(k):
    hit[j : n - k + 1 + j] |= starts
  return hit


def word_labels(tokens: np.ndarray, drawn, all_nouns) -> np.ndarray:
  """int32 [len(tokens)]: get_noun_masks of one caption (``tokens``: its CLIP tokens, padding
  included, as the original scans them), its drawn nouns and all its nouns."""
  tokens = np.asarray(tokens)
  labels = np.full(tokens.shape, -1, np.int32)
  for noun in all_nouns:
    labels[_mark(tokens, _bpe(noun))] = 0
  for i, noun in enumerate(drawn):
    labels[_mark(tokens, _bpe(noun))] = i + 1
  return labels


def full_imagenet_templates() -> tuple[str, ...]:
  from tcl_jax.zeroshot import prompts

  return prompts.get_templates("full")


def code_text(text_tokens, drawn, templates, all_nouns) -> dict:
  """The text keys of a CoDe batch.

  text_tokens: int [b, 77] the captions' tokens; drawn: [b][N] str, the drawn nouns in order;
  templates: int [b, N] indices into the 80 full_imagenet_templates; all_nouns: [b] lists of
  each record's nouns. Returns {"noun_tokens": i32 [b, N, 60], "kg_tokens": i32 [b, N, 77],
  "word_labels": i32 [b, 77]}.
  """
  text_tokens = np.asarray(text_tokens)
  templates = np.asarray(templates)
  b, n = templates.shape
  flat = [noun for row in drawn for noun in row]
  if len(flat) != b * n:
    raise ValueError(f"drawn nouns: expected {b} rows of {n}, got {[len(r) for r in drawn]}")
  table = full_imagenet_templates()
  kg = [table[t].format(noun) for t, noun in zip(templates.reshape(-1).tolist(), flat)]
  noun_tokens = tokenizer.tokenize(flat, NOUN_CONTEXT_LENGTH)[:, 1:]
  length = NOUN_CONTEXT_LENGTH - 1
  return {
    "noun_tokens": noun_tokens.reshape(b, n, length).astype(np.int32),
    "kg_tokens": tokenizer.tokenize(kg, CONTEXT_LENGTH).reshape(b, n, -1).astype(np.int32),
    "word_labels": np.stack(
      [word_labels(t, d, a) for t, d, a in zip(text_tokens, drawn, all_nouns)]
    ).reshape(b, -1),
  }
