"""CLIP BPE tokenizer, id-for-id compatible with OpenAI CLIP's
``clip.tokenize(texts, context_length=77, truncate=True)`` as used by the
original TCL (``sclip/simple_tokenizer.py`` + ``sclip/clip.py``).

The BPE itself runs in the HF ``tokenizers`` library (Rust, batched); only the
text clean-up is done in Python, because it has to reproduce the original's
Python semantics exactly:

1. ``ftfy.fix_text`` (``ftfy`` is required, see below),
2. ``html.unescape`` applied twice, ``strip()``,
3. every run of ``\\s`` (the ``regex`` module's definition, i.e. Unicode
   White_Space) collapsed to one space, ``strip()``,
4. ``str.lower()``.

Then the original's word regex (case-insensitive, leftmost alternative wins)
splits the text; each piece is mapped to its UTF-8 bytes (GPT-2 byte->unicode
table), BPE-merged with a ``</w>`` end-of-word suffix, and looked up in the
49408-entry vocabulary built from ``assets/bpe_simple_vocab_16e6.txt.gz``.
A sequence is ``<|startoftext|> ids <|endoftext|>`` zero-padded to
``context_length``; longer ones keep their first ``context_length`` tokens with
the last one replaced by ``<|endoftext|>`` (the original's ``truncate=True``).

ftfy: the original calls ``ftfy.fix_text`` on every caption. It is a no-op on
printable ASCII text without ``&`` (the vast majority of captions), which is
therefore fast-pathed around it. On other text it matters (curly quotes become
``'``, ligatures / full-width forms are folded, text is NFC-normalised, HTML
entities are unescaped until stable, control characters removed, mojibake
fixed), so ``ftfy`` is a requirement (pinned in requirements.txt): without it,
building a tokenizer raises ImportError (the module itself still imports, so
code that never tokenizes, e.g. ``tcl_jax.bench``, does not need it).

Literal ``<|startoftext|>`` / ``<|endoftext|>`` inside a caption become the
special ids exactly where the original's regex would isolate them (rare; such
texts take a slower per-piece path).
"""

from __future__ import annotations

from collections.abc import Iterable
import functools
import gzip
import html
import itertools
import operator
from pathlib import Path
import re

import numpy as np
from tokenizers import Regex
from tokenizers import Tokenizer
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors

try:  # pragma: no cover - depends on the environment
  from ftfy import fix_text as _ftfy_fix_text
except ImportError:  # pragma: no cover
  _ftfy_fix_text = None

__all__ = [
  "ClipTokenizer",
  "get_tokenizer",
  "tokenize",
  "DEFAULT_BPE_PATH",
  "SOT_TOKEN",
  "EOT_TOKEN",
  "SOT_ID",
  "EOT_ID",
  "VOCAB_SIZE",
  "CONTEXT_LENGTH",
]

DEFAULT_BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: file lines [1, 48895)
_EOW = "</w>"

# Word splitting of the original (`regex` module, re.IGNORECASE), run by the
# Oniguruma engine of `tokenizers` (same leftmost-alternative semantics). It is
# applied to lower-cased, whitespace-collapsed text, which lets it be written
# case-sensitively and exactly (checked over all code points against `regex`):
# * the only whitespace left is " ", so `\s` is a literal space (Oniguruma's
#   `\s` set differs slightly from `regex`'s);
# * IGNORECASE still lets U+017F LATIN SMALL LETTER LONG S match "s"
#   (in "'s" and "<|startoftext|>");
# * U+0345 COMBINING GREEK YPOGEGRAMMENI case-folds to a letter (iota), so
#   under IGNORECASE `regex` excludes it from `[^\s\p{L}\p{N}]` while
#   `[\p{L}]` does not match it either: the original silently drops it.
_WORD_PATTERN = (
  r"<\|[s\x{017F}]tartoftext\|>|<\|endoftext\|>|'[s\x{017F}]|'t|'re|'ve|'m|'ll|'d"
  r"|[\p{L}]+|[\p{N}]|[^ \p{L}\p{N}\x{0345}]+"
)
# `\s` of the `regex` module (Unicode White_Space). Python's str.isspace() also
# counts U+001C..U+001F, which `regex` does not.
_WHITESPACE_RE = re.compile(
  "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)

FTFY_MISSING = (
  "ftfy is not installed, and CLIP's tokenization needs it (the original applies "
  "ftfy.fix_text to every text; without it ids differ for non-ASCII, HTML-escaped "
  "or control-character text): pip install ftfy (requirements.txt pins "
  "ftfy==6.3.1)"
)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP reversible byte -> printable unicode char table.

  Insertion order matters: it is the order of the first 256 vocab ids
  (bytes that are printable latin-1 map to themselves, in increasing order,
  followed by the remaining bytes mapped to U+0100.. in increasing order).
  """
  printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  printable_set = set(printable)
  others = [b for b in range(256) if b not in printable_set]
  table = {b: chr(b) for b in printable}
  table.update({b: chr(0x100 + i) for i, b in enumerate(others)})
  return table


@functools.lru_cache(maxsize=4)
def _load_vocab(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = []
  for line in lines[1 : 1 + _NUM_MERGES]:
    left, right = line.split()
    merges.append((left, right))
  byte_chars = list(_bytes_to_unicode().values())
  tokens = byte_chars + [c + _EOW for c in byte_chars]
  tokens += [left + right for left, right in merges]
  tokens += [SOT_TOKEN, EOT_TOKEN]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != VOCAB_SIZE or vocab[SOT_TOKEN] != SOT_ID or vocab[EOT_TOKEN] != EOT_ID:
    raise ValueError(f"unexpected CLIP BPE vocabulary in {bpe_path}")
  return vocab, merges


def _clean(text: str, use_ftfy: bool) -> str:
  """The original's ``whitespace_clean(basic_clean(text)).lower()``."""
  if text.isascii() and text.isprintable() and "&" not in text:
    # ftfy and html.unescape are identities here and " " is the only
    # whitespace character, so str.split() == regex `\s+` splitting.
    return " ".join(text.split()).lower()
  if use_ftfy:
    text = _ftfy_fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  text = _WHITESPACE_RE.sub(" ", text).strip()
  return text.lower()


class ClipTokenizer:
  """CLIP BPE tokenizer (``clip.tokenize(..., truncate=True)`` semantics).

  Args:
      context_length: length of every output row (77 for all CLIP models).
      bpe_path: gzip'd BPE merges file (defaults to the packaged one).
      use_ftfy: apply ``ftfy.fix_text`` like the original (the default; ImportError
          when ftfy is not installed). ``False`` skips it on purpose: ids then
          differ from the original for text that ftfy would have changed.
  """

  def __init__(
    self,
    context_length: int = CONTEXT_LENGTH,
    bpe_path: str | Path = DEFAULT_BPE_PATH,
    use_ftfy: bool = True,
  ):
    if isinstance(context_length, bool) or operator.index(context_length) < 2:
      raise ValueError(f"context_length must be an int >= 2, got {context_length!r}")
    context_length = operator.index(context_length)
    if use_ftfy and _ftfy_fix_text is None:
      raise ImportError(FTFY_MISSING)
    self.context_length = context_length
    self.use_ftfy = bool(use_ftfy)
    self.sot_id = SOT_ID
    self.eot_id = EOT_ID
    self.vocab_size = VOCAB_SIZE

    vocab, merges = _load_vocab(str(bpe_path))
    self._id_to_token = {i: t for t, i in vocab.items()}
    self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    self._special_ids = {SOT_TOKEN: SOT_ID, EOT_TOKEN: EOT_ID}

    tok = Tokenizer(
      models.BPE(
        vocab=vocab,
        merges=merges,
        end_of_word_suffix=_EOW,
        cache_capacity=200_000,
        fuse_unk=False,
        ignore_merges=False,
      )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
    tok.post_processor = processors.TemplateProcessing(
      single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
      special_tokens=[(SOT_TOKEN, SOT_ID), (EOT_TOKEN, EOT_ID)],
    )
    # max_length counts the 2 template tokens: sot + ids[:L-2] + eot, which
    # equals the original's `tokens[:L]; tokens[-1] = eot`. Zero padding is
    # done in numpy (tokenizers' padding would cost ~40% of the time).
    tok.enable_truncation(max_length=context_length)
    tok.no_padding()
    self._tok = tok
    self._positions = np.arange(context_length)

  # ------------------------------------------------------------------ encode
  def encode(self, texts: str | Iterable[str]) -> np.ndarray:
    """Tokenize ``texts`` -> int32 array ``[len(texts), context_length]``."""
    texts = _as_str_list(texts)
    cleaned = [_clean(t, self.use_ftfy) for t in texts]
    out = np.zeros((len(cleaned), self.context_length), dtype=np.int32)
    if not cleaned:
      return out
    rows = [e.ids for e in self._tok.encode_batch_fast(cleaned, add_special_tokens=True)]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(
      itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum())
    )
    out[self._positions < lengths[:, None]] = flat  # row-major fill of each prefix
    for i, text in enumerate(cleaned):
      if "<|" in text and (SOT_TOKEN in text or EOT_TOKEN in text):
        out[i] = self._encode_with_specials(text)
    return out

  __call__ = encode

  def _piece_ids(self, cleaned: str) -> list[int]:
    """BPE ids of an already cleaned text, special strings honoured."""
    ids: list[int] = []
    for piece, _ in self._tok.pre_tokenizer.pre_tokenize_str(cleaned):
      special = self._special_ids.get(piece)
      if special is not None:
        ids.append(special)
      else:
        ids.extend(t.id for t in self._tok.model.tokenize(piece))
    return ids

  def _encode_with_specials(self, cleaned: str) -> np.ndarray:
    """Slow path for texts containing literal special-token strings."""
    ids = [SOT_ID, *self._piece_ids(cleaned), EOT_ID]
    if len(ids) > self.context_length:
      ids = ids[: self.context_length]
      ids[-1] = EOT_ID
    row = np.zeros(self.context_length, dtype=np.int32)
    row[: len(ids)] = ids
    return row

  def bpe_ids(self, text: str) -> list[int]:
    """Ids of one text without sot/eot, padding or truncation."""
    (text,) = _as_str_list([text])
    return self._piece_ids(_clean(text, self.use_ftfy))

  def decode(self, ids: Iterable[int]) -> str:
    """Inverse mapping like the original's ``decode`` (``</w>`` -> space)."""
    data = bytearray()
    for i in ids:
      token = self._id_to_token[int(i)]
      end_of_word = token.endswith(_EOW)
      if end_of_word:
        token = token[: -len(_EOW)]
      # special tokens are plain ASCII, which the byte table maps to itself
      data += bytes(self._byte_decoder[c] for c in token)
      if end_of_word:
        data += b" "
    return data.decode("utf-8", errors="replace")


def _as_str_list(texts) -> list[str]:
  if isinstance(texts, str):
    return [texts]
  if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
    raise TypeError(f"texts must be a str or an iterable of str, got {type(texts).__name__}")
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      hint = ""
      if isinstance(t, (bytes, bytearray)):
        hint = " (decode bytes first, e.g. t.decode('utf-8'))"
      raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}{hint}")
  return texts


@functools.lru_cache(maxsize=None)
def get_tokenizer(context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
  """Process-wide cached :class:`ClipTokenizer` for ``context_length``."""
  return ClipTokenizer(context_length=context_length)


def tokenize(texts: str | Iterable[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """``clip.tokenize(texts, context_length, truncate=True)`` as int32 numpy.

  A single str gives shape ``[1, context_length]``.
  """
  return get_tokenizer(context_length).encode(texts)
