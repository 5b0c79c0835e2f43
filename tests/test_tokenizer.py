"""Tests for tcl_jax.tokenizer (CLIP BPE, ``clip.tokenize(..., truncate=True)``).

Every literal id row below (edge cases, known ids, special-token strings, the regex and ftfy
quirks, truncation, context lengths) was regenerated from the original tokenizer: kakaobrain/tcl
@ bc2b551 ``sclip/simple_tokenizer.py`` with its bundled ``bpe_simple_vocab_16e6.txt.gz``, ids
assembled as its ``sclip/clip.py:tokenize(..., truncate=True)`` does, run outside this repository
(ftfy 6.3.1, regex 2026.11.19), on 2026-11-27. They all matched the rows as written.
"""

import gzip
import html
import json
from pathlib import Path
import random
import string
import subprocess
import sys

import ftfy
import numpy as np
import pytest

from tcl_jax import tokenizer as tok_mod
from tcl_jax.tokenizer import EOT_ID
from tcl_jax.tokenizer import SOT_ID
from tcl_jax.tokenizer import ClipTokenizer
from tcl_jax.tokenizer import get_tokenizer
from tcl_jax.tokenizer import tokenize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE_DIR = SHARED / "fixtures" / "tcl_tiny"


def _fixture():
  if not SHARED.exists():
    pytest.skip("../shared fixtures not present (clone without the shared fixtures)")
  meta = json.loads((FIXTURE_DIR / "fixture.json").read_text())
  arrays = np.load(FIXTURE_DIR / "fixture.npz")
  return meta, arrays


@pytest.fixture(scope="module")
def tk():
  return get_tokenizer()


def _row(ids):
  row = np.zeros(77, dtype=np.int32)
  row[: len(ids)] = ids
  return row


# ----------------------------------------------------------------- fixture
def test_fixture_tokenizer_ids():
  meta, arrays = _fixture()
  ids = tokenize(meta["tokenizer_corpus"])
  ref = arrays["tokenizer_ids"]
  assert ids.shape == ref.shape == (53, 77)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, ref)


def test_fixture_class_tokens():
  meta, arrays = _fixture()
  ref = arrays["class_tokens"]
  got = np.stack([tokenize([t.format(c) for t in meta["templates"]]) for c in meta["classnames"]])
  assert got.shape == ref.shape == (5, 9, 77)
  np.testing.assert_array_equal(got, ref)


# -------------------------------------------------------------- edge cases
def test_empty_string():
  out = tokenize("")
  assert out.shape == (1, 77) and out.dtype == np.int32
  np.testing.assert_array_equal(out[0], _row([49406, 49407]))
  assert (SOT_ID, EOT_ID) == (49406, 49407)
  np.testing.assert_array_equal(tokenize(["   \t\n "]), out)


def test_empty_batch():
  out = tokenize([])
  assert out.shape == (0, 77) and out.dtype == np.int32


def test_known_ids():
  # ids from the original sclip SimpleTokenizer (see the module docstring)
  np.testing.assert_array_equal(
    tokenize("a photo of a dog")[0], _row([49406, 320, 1125, 539, 320, 1929, 49407])
  )
  out = tokenize(["12345", "photography unbelievably", "it's", "naïve 東京 😀"])
  np.testing.assert_array_equal(out[0], _row([49406, 272, 273, 274, 275, 276, 49407]))
  np.testing.assert_array_equal(out[1], _row([49406, 2108, 33781, 49407]))
  np.testing.assert_array_equal(out[2], _row([49406, 585, 568, 49407]))
  np.testing.assert_array_equal(
    out[3], _row([49406, 1097, 35689, 563, 48338, 21078, 361, 7334, 49407])
  )


def test_single_string_and_batch_agree():
  texts = ["a dog", "two red apples on a wooden table", ""]
  batch = tokenize(texts)
  for i, t in enumerate(texts):
    np.testing.assert_array_equal(tokenize(t)[0], batch[i])


def test_truncation(tk):
  text = " ".join(["photo", "dog", "beach", "12", "!?"] * 40)
  full = tk.bpe_ids(text)
  assert len(full) > 200
  out = tokenize(text)
  assert out.shape == (1, 77)
  assert out[0, 0] == 49406
  assert out[0, 76] == 49407
  # first 76 tokens are kept (sot + first 75 text ids), the last becomes eot
  np.testing.assert_array_equal(out[0, 1:76], full[:75])
  # exactly at the limit: 75 text ids + sot + eot fit without truncation
  words75 = " ".join(["dog"] * 75)
  row = tokenize(words75)[0]
  assert list(row) == [49406] + [1929] * 75 + [49407]
  row = tokenize(words75 + " cat")[0]
  assert list(row) == [49406] + [1929] * 75 + [49407]


def test_context_length():
  out = tokenize(["a photo of a dog"], context_length=5)
  np.testing.assert_array_equal(out, [[49406, 320, 1125, 539, 49407]])
  out = tokenize(["a dog"], context_length=10)
  np.testing.assert_array_equal(out, [[49406, 320, 1929, 49407, 0, 0, 0, 0, 0, 0]])
  assert ClipTokenizer(context_length=16).encode(["x"]).shape == (1, 16)


def test_case_insensitive():
  a = tokenize(["A Man Riding a BICYCLE down a busy Street in SEOUL!"])
  b = tokenize(["a man riding a bicycle down a busy street in seoul!"])
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(tokenize("A Photo Of A DOG"), tokenize("a photo of a dog"))


def test_whitespace_and_html():
  np.testing.assert_array_equal(tokenize("a&amp;b"), tokenize("a&b"))
  np.testing.assert_array_equal(tokenize("a&amp;amp;b"), tokenize("a&b"))  # unescaped twice
  np.testing.assert_array_equal(tokenize("&lt;tag&gt; &quot;q&quot;"), tokenize('<tag> "q"'))
  np.testing.assert_array_equal(
    tokenize("  a \t photo\n\nof \u3000 a\xa0dog  "), tokenize("a photo of a dog")
  )
  # punctuation runs are one piece, digits are split one by one
  np.testing.assert_array_equal(
    tokenize("x!<|endoftext|>y")[0],
    _row([49406, 343, 0, 27, 347, 40786, 4160, 91, 285, 344, 49407]),
  )


def test_special_token_strings():
  # a literal special token isolated by the word regex maps to its id
  np.testing.assert_array_equal(
    tokenize("a <|endoftext|> b")[0], _row([49406, 320, 49407, 321, 49407])
  )
  np.testing.assert_array_equal(tokenize("<|startoftext|>a")[0], _row([49406, 49406, 320, 49407]))
  # still truncated like the others
  row = tokenize("<|endoftext|>" * 100)[0]
  assert list(row) == [49406] + [49407] * 76


def test_special_token_strings_truncate_with_eot():
  # Texts with special strings take the slow path; a long one keeps its first 76 tokens and ends
  # in EOT as clip.tokenize(truncate=True) does (rows checked against kakaobrain/tcl@bc2b551's
  # sclip/simple_tokenizer.py + clip.py:tokenize). "dog" is 1929, "a" 320.
  dog = lambda n: [1929] * n
  rows = tokenize(
    [
      "a <|endoftext|> " + "dog " * 100,
      "<|startoftext|> " + "dog " * 80,
      "<|endoftext|> " + "dog " * 75,  # 78 tokens: one over
      "<|endoftext|> " + "dog " * 74,  # 77: fits as it is
      "<|endoftext|> " + "dog " * 73,
    ]
  )
  assert list(rows[0]) == [49406, 320, 49407] + dog(73) + [49407]
  assert list(rows[1]) == [49406, 49406] + dog(74) + [49407]
  assert list(rows[2]) == [49406, 49407] + dog(74) + [49407]
  assert list(rows[3]) == [49406, 49407] + dog(74) + [49407]
  assert list(rows[4]) == [49406, 49407] + dog(73) + [49407, 0]
  short = tokenize("a <|endoftext|> " + "dog " * 100, context_length=10)[0]
  assert list(short) == [49406, 320, 49407] + dog(6) + [49407]


def test_regex_case_folding_quirks():
  # IGNORECASE: "'" + LONG S matches the "'s" alternative as one piece
  np.testing.assert_array_equal(tokenize("it'\u017f")[0], _row([49406, 585, 6, 129, 379, 49407]))
  # U+0345 matches no alternative under IGNORECASE and is dropped
  np.testing.assert_array_equal(tokenize("a\u0345b"), tokenize("a b"))


def test_missing_ftfy_is_an_error_not_a_silent_fallback():
  # A Python where ftfy cannot be imported (sys.modules[name] = None makes `import` fail):
  # the module imports, building a tokenizer raises, naming the pinned requirement.
  code = (
    "import sys; sys.modules['ftfy'] = None\n"
    "from tcl_jax import tokenizer\n"
    "try:\n"
    "    tokenizer.tokenize('caf\\u00e9')\n"
    "except ImportError as e:\n"
    "    print('ImportError:', e)\n"
    "    raise SystemExit(3)\n"
    "print('tokenized without ftfy')\n"
  )
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert r.returncode == 3, (r.stdout, r.stderr)
  assert "ImportError: ftfy is not installed" in r.stdout and "ftfy==6.3.1" in r.stdout
  # Skipping it is only ever explicit.
  assert not ClipTokenizer(use_ftfy=False).use_ftfy and ClipTokenizer().use_ftfy


def test_ftfy_fixes():
  assert tok_mod.get_tokenizer().use_ftfy
  np.testing.assert_array_equal(tokenize("don\u2019t"), tokenize("don't"))
  np.testing.assert_array_equal(tokenize("don't")[0], _row([49406, 847, 713, 49407]))
  np.testing.assert_array_equal(tokenize("\ufb01sh"), tokenize("fish"))  # ligature
  np.testing.assert_array_equal(tokenize("cafe\u0301"), tokenize("caf\xe9"))  # NFC
  np.testing.assert_array_equal(tokenize("\uff28\uff45\uff4c\uff4c\uff4f"), tokenize("hello"))
  np.testing.assert_array_equal(tokenize("a&amp;amp;amp;b"), tokenize("a&b"))
  np.testing.assert_array_equal(tokenize("a\x0bb")[0], _row([49406, 3937, 49407]))  # removed


def test_ascii_fast_path_is_ftfy_identity():
  # tokenizer skips ftfy for printable ASCII without '&': check that premise
  rnd = random.Random(0)
  alphabet = string.printable[:94].replace("&", "") + " "
  for _ in range(2000):
    s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
    assert ftfy.fix_text(s) == s


def test_type_errors():
  with pytest.raises(TypeError, match="str"):
    tokenize(123)
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tokenize(["ok", None])
  with pytest.raises(TypeError, match="decode"):
    tokenize([b"bytes caption"])
  with pytest.raises(TypeError):
    tokenize(b"bytes caption")
  with pytest.raises(TypeError):
    get_tokenizer().encode([1.5])


def test_get_tokenizer_cached():
  assert get_tokenizer() is get_tokenizer()
  assert get_tokenizer().context_length == 77


def test_decode(tk):
  assert tk.decode(tk.bpe_ids("A photo of a Dog!")) == "a photo of a dog ! "
  row = tokenize("naïve 東京")[0]
  assert tk.decode(row[: int((row != 0).sum())]) == "<|startoftext|>naïve 東京 <|endoftext|>"


# ------------------------------------------- independent reference BPE check
def _reference_tables():
  """Vocab / merge ranks rebuilt independently from the packaged merges file."""
  printable = [b for b in range(256) if 0x21 <= b <= 0x7E or (0xA1 <= b <= 0xFF and b != 0xAD)]
  rest = [b for b in range(256) if b not in printable]
  byte_char = {b: chr(b) for b in printable}
  byte_char.update({b: chr(256 + n) for n, b in enumerate(rest)})
  with gzip.open(tok_mod.DEFAULT_BPE_PATH, "rt", encoding="utf-8") as f:
    merges = [tuple(line.split()) for line in f.read().split("\n")[1:48895]]
  chars = [byte_char[b] for b in printable + rest]
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  vocab = {t: i for i, t in enumerate(tokens)}
  ranks = {m: r for r, m in enumerate(merges)}
  return byte_char, vocab, ranks


def _reference_bpe_ids(text, tables, regex):
  byte_char, vocab, ranks = tables
  text = " ".join(html.unescape(html.unescape(text)).split()).lower()
  pattern = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
  ids = []
  for word in regex.findall(pattern, text, flags=regex.IGNORECASE):
    sym = [byte_char[b] for b in word.encode("utf-8")]
    sym[-1] += "</w>"
    while len(sym) > 1:
      pairs = list(zip(sym, sym[1:]))
      best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
      if best not in ranks:
        break
      merged, i = [], 0
      while i < len(sym):
        if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
          merged.append(sym[i] + sym[i + 1])
          i += 2
        else:
          merged.append(sym[i])
          i += 1
      sym = merged
    ids.extend(vocab[s] for s in sym)
  return ids


def test_against_reference_bpe(tk):
  import regex  # pinned in requirements.txt for this test

  tables = _reference_tables()
  texts = [
    "a photo of a dog running on the beach",
    "Aerial view of the city at night, with lights",
    "UPPER case Words, numbers 12345 and punctuation?!",
    "they're sure it'll rain; we've seen I'm right & you'd agree",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "naïve façade résumé Zürich São Paulo",
    "東京タワー の 夜景 — 서울 야경 🌃🌉 !!!",
    "Ελληνικά Русский текст العربية हिन्दी",
    "$$$ 100% ~~~ <<>> ... ---",
    "x'y 'quoted' '' 's 'S",
  ]
  for t in texts:
    assert tk.bpe_ids(t) == _reference_bpe_ids(t, tables, regex), t
