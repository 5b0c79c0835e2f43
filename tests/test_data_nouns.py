"""CoDe's nouns and batches: the NLTK rule, convert --nouns, word labels against the authors' code,
the input pipeline's CoDe batches (draws, drops, determinism), the synthetic world's nouns, and
TCL batches left as they were."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import pytest  # noqa: E402

from tcl_jax import tokenizer  # noqa: E402
from tcl_jax.data import convert  # noqa: E402
from tcl_jax.data import in_memory  # noqa: E402
from tcl_jax.data import nouns  # noqa: E402
from tcl_jax.data import schema  # noqa: E402
from tcl_jax.data import synthetic  # noqa: E402
from tcl_jax.data.augment import AugmentConfig  # noqa: E402
from tcl_jax.data.input_pipeline import make_train_iterator  # noqa: E402
from tcl_jax.zeroshot import prompts  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

PLAIN = AugmentConfig(deit_aug=False)  # random crop + flip: the example seeds matter
AUTHORS = os.environ.get("TCL_JAX_CODE_REPO", "")  # a checkout of the CoDe authors' code, if any

# ---------------------------------------------------------------------------------------------
# The NLTK rule (datasets/noun_parser.py, word_type="noun")
# ---------------------------------------------------------------------------------------------

# nltk.pos_tag(nltk.word_tokenize(caption)) with NLTK 3.10.4's English tagger (the
# averaged_perceptron_tagger model of nltk_data), and the nouns the authors' rule keeps.
TAGGED = {
  "A dog and a cat sitting on a couch in the living room.": [
    ("A", "DT"), ("dog", "NN"), ("and", "CC"), ("a", "DT"), ("cat", "NN"), ("sitting", "VBG"),
    ("on", "IN"), ("a", "DT"), ("couch", "NN"), ("in", "IN"), ("the", "DT"), ("living", "NN"),
    ("room", "NN"), (".", "."),
  ],
  "Illustration of a red apple on a wooden table": [
    ("Illustration", "NN"), ("of", "IN"), ("a", "DT"), ("red", "JJ"), ("apple", "NN"),
    ("on", "IN"), ("a", "DT"), ("wooden", "NN"), ("table", "NN"),
  ],
  "vitamin c and vitamin d in a glass": [
    ("vitamin", "NN"), ("c", "NN"), ("and", "CC"), ("vitamin", "NN"), ("d", "NN"), ("in", "IN"),
    ("a", "DT"), ("glass", "NN"),
  ],
  "plan A and plan B for the team": [
    ("plan", "NN"), ("A", "DT"), ("and", "CC"), ("plan", "NN"), ("B", "NNP"), ("for", "IN"),
    ("the", "DT"), ("team", "NN"),
  ],
  "<PERSON> walks in Paris with friends": [
    ("<", "JJ"), ("PERSON", "NNP"), (">", "NNP"), ("walks", "NNS"), ("in", "IN"),
    ("Paris", "NNP"), ("with", "IN"), ("friends", "NNS"),
  ],
  "a man with dogs and Cats in New York": [
    ("a", "DT"), ("man", "NN"), ("with", "IN"), ("dogs", "NNS"), ("and", "CC"), ("Cats", "NNPS"),
    ("in", "IN"), ("New", "NNP"), ("York", "NNP"),
  ],
  "Dogs, dogs and more dogs": [
    ("Dogs", "NNS"), (",", ","), ("dogs", "NNS"), ("and", "CC"), ("more", "JJR"), ("dogs", "NNS"),
  ],
  "person x on the left of person y": [
    ("person", "NN"), ("x", "NN"), ("on", "IN"), ("the", "DT"), ("left", "NN"), ("of", "IN"),
    ("person", "NN"), ("y", "NN"),
  ],
}  # fmt: skip
EXPECTED = {
  "A dog and a cat sitting on a couch in the living room.": [
    "cat", "couch", "dog", "living", "room",
  ],
  "Illustration of a red apple on a wooden table": ["Illustration", "apple", "table", "wooden"],
  "vitamin c and vitamin d in a glass": ["glass", "vitamin"],  # 'c', 'd': single letters
  "plan A and plan B for the team": ["B", "plan", "team"],  # only lowercase letters go
  "<PERSON> walks in Paris with friends": ["PERSON", "Paris", "friends", "walks"],  # '>' goes
  "a man with dogs and Cats in New York": ["Cats", "New", "York", "dogs", "man"],  # NNPS too
  "Dogs, dogs and more dogs": ["Dogs", "dogs"],  # unique, case kept
  "person x on the left of person y": ["left", "person"],
}  # fmt: skip


def test_rule_on_tagged_tokens():
  for caption, tagged in TAGGED.items():
    assert nouns.nouns_from_tagged(tagged) == EXPECTED[caption], caption


def test_rule_keeps_the_four_noun_tags_and_drops_only_lowercase_letters_and_angles():
  tagged = [(w, "NN") for w in "a b z < > A Z ab << é".split()]
  tagged += [("dog", "VB"), ("run", "NNZ"), ("ran", "NNS "), ("cats", "NNS"), ("Ann", "NNP")]
  tagged += [("Cats", "NNPS"), ("cats", "NNS"), ("x", "JJ")]
  assert nouns.nouns_from_tagged(tagged) == ["<<", "A", "Ann", "Cats", "Z", "ab", "cats", "é"]
  assert nouns.nouns_from_tagged([]) == []


def _nltk_ready() -> bool:
  try:
    import nltk  # noqa: F401
  except ImportError:
    return False
  return nouns.nltk_problem() is None


needs_nltk_data = pytest.mark.skipif(
  not _nltk_ready(), reason="NLTK or its punkt_tab / averaged_perceptron_tagger_eng data missing"
)


@needs_nltk_data
def test_real_nltk_tags_and_nouns():
  import nltk

  for caption, tagged in TAGGED.items():
    assert nltk.pos_tag(nltk.word_tokenize(caption)) == tagged, caption
    assert nouns.caption_nouns(caption) == EXPECTED[caption], caption
  assert nouns.caption_nouns("") == [] and nouns.caption_nouns("   ") == []


@needs_nltk_data
def test_in_memory_nouns_are_what_nltk_finds():
  assert [nouns.caption_nouns(c) for c in in_memory._CAPTIONS] == list(in_memory.NOUNS)


def test_nltk_problem_without_nltk(monkeypatch):
  monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk -> ModuleNotFoundError
  assert nouns.nltk_problem() == (
    '--nouns needs NLTK, which the nouns extra installs: pip install -e ".[nouns]"'
  )


def _fake_nltk(version, present):
  def find(resource):
    if resource not in present:
      raise LookupError(resource)
    return resource

  def word_tokenize(text):
    raise LookupError("punkt")

  return types.SimpleNamespace(
    __version__=version,
    data=types.SimpleNamespace(find=find),
    word_tokenize=word_tokenize,
    pos_tag=lambda words: [],
  )


def test_nltk_problem_names_the_missing_data_by_nltk_version(monkeypatch):
  monkeypatch.setitem(sys.modules, "nltk", _fake_nltk("3.10.4", set()))
  assert nouns.nltk_problem() == (
    "--nouns needs NLTK's punkt_tab and averaged_perceptron_tagger_eng data, not found here: "
    "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng"
  )
  monkeypatch.setitem(
    sys.modules, "nltk", _fake_nltk("3.9", {"taggers/averaged_perceptron_tagger_eng/"})
  )
  assert nouns.nltk_problem().endswith(": python -m nltk.downloader punkt_tab")
  old = _fake_nltk("3.8.1", {"tokenizers/punkt/english.pickle"})
  monkeypatch.setitem(sys.modules, "nltk", old)
  assert nouns.nltk_problem() == (
    "--nouns needs NLTK's averaged_perceptron_tagger data, not found here: "
    "python -m nltk.downloader averaged_perceptron_tagger"
  )


def _system_nltk_data() -> bool:
  """Whether NLTK data lies where NLTK looks besides $NLTK_DATA and ~ (then the CLI test below
  cannot make it missing)."""
  dirs = ["/usr/share", "/usr/local/share", "/usr/lib", "/usr/local/lib", sys.prefix]
  dirs += [os.path.join(sys.prefix, d) for d in ("share", "lib")]
  return any(os.path.isdir(os.path.join(d, "nltk_data")) for d in dirs)


@pytest.mark.skipif(_system_nltk_data(), reason="NLTK data installed system-wide")
def test_cli_nouns_without_nltk_data_is_one_line(tmp_path):
  (tmp_path / "pairs.csv").write_text("filepath,caption\nx.png,a dog\n")
  (tmp_path / "empty").mkdir()
  out = tmp_path / "out"
  env = dict(os.environ, NLTK_DATA=str(tmp_path / "empty"), HOME=str(tmp_path))
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.data.convert", "csv", str(tmp_path / "pairs.csv")]
    + ["--output", str(out), "--nouns"],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr and r.stdout == ""
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  try:
    import nltk  # noqa: F401

    fix = "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng"
  except ImportError:
    fix = 'pip install -e ".[nouns]"'
  assert lines[0].startswith("error: --nouns needs NLTK") and lines[0].endswith(fix), lines[0]
  assert not out.exists()  # refused before the output was claimed


# ---------------------------------------------------------------------------------------------
# convert --nouns
# ---------------------------------------------------------------------------------------------


def _png(value, size=16):
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _pairs_csv(tmp_path, captions):
  (tmp_path / "imgs").mkdir()
  rows = ["filepath\tcaption"]
  for i, c in enumerate(captions):
    (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(i * 20))
    rows.append(f"imgs/{i}.png\t{c}")
  (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
  return str(tmp_path / "pairs.tsv")


def _records(out_dir):
  import tensorflow as tf

  recs = {}
  for f in sorted(os.listdir(out_dir)):
    if f.endswith(schema.SHARD_SUFFIX):
      for r in tf.data.TFRecordDataset(os.path.join(out_dir, f)):
        feats = tf.train.Example.FromString(r.numpy()).features.feature
        caption = feats[schema.CAPTION].bytes_list.value[0].decode()
        got = feats[schema.NOUNS].bytes_list.value if schema.NOUNS in feats else None
        recs[caption] = None if got is None else [n.decode() for n in got]
  return recs


def test_convert_nouns_stores_each_captions_nouns(tmp_path, capsys, monkeypatch):
  captions = ["two dogs on a mat", "an empty room", "nothing"]
  fake = {"two dogs on a mat": ["mat", "dogs", "mat"], "an empty room": ["room"], "nothing": []}
  monkeypatch.setattr(nouns, "nltk_problem", lambda: None)
  monkeypatch.setattr(nouns, "caption_nouns", fake.__getitem__)
  csv = _pairs_csv(tmp_path, captions)
  out = tmp_path / "out"
  assert convert.main(["csv", csv, "--output", str(out), "--workers", "1", "--nouns"]) == 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["written"] == 3
  # sorted, unique; an empty list is stored too ("looked, found none")
  assert _records(out) == {"two dogs on a mat": ["dogs", "mat"], "an empty room": ["room"],
                           "nothing": []}  # fmt: skip
  assert json.loads((out / convert.MANIFEST).read_text())["nouns"] is True
  # Without --nouns: no feature, and a manifest like those written before --nouns existed.
  plain = tmp_path / "plain"
  assert convert.main(["csv", csv, "--output", str(plain), "--workers", "1"]) == 0
  assert set(_records(plain).values()) == {None}
  assert "nouns" not in json.loads((plain / convert.MANIFEST).read_text())


@needs_nltk_data
def test_convert_nouns_with_real_nltk(tmp_path, capsys):
  csv = _pairs_csv(tmp_path, list(EXPECTED))
  out = tmp_path / "out"
  assert convert.main(["csv", csv, "--output", str(out), "--workers", "1", "--nouns"]) == 0
  assert _records(out) == EXPECTED


# ---------------------------------------------------------------------------------------------
# Word labels (datasets/builder.py TextPreprocess.get_noun_masks) and the batch text
# ---------------------------------------------------------------------------------------------

LONG = "a dog " + "and a cat " * 30 + "on a mat"  # 95 BPE tokens: "mat" lies past the 77
# (caption, drawn nouns, all the record's nouns) -> {position: label} of the labels that are
# not -1, computed with the authors' own get_noun_masks and sclip tokenizer (a harness that
# runs their source with numpy in place of torch).
LABEL_CASES = [
  ("the cat sat on the cat mat", ["mat", "cat"], ["cat", "mat"], {2: 2, 6: 2, 7: 1}),
  # "skateboarders" is skate|boar|ders: the noun "boarders" (boar|ders) matches inside it
  ("skateboarders and boarders at the skate park", ["boarders", "park"],
   ["boarders", "park", "skate", "skateboarders"], {1: 0, 2: 1, 3: 1, 5: 1, 6: 1, 9: 0, 10: 2}),
  # "mat" is truncated away, "zebra" is not in the caption at all
  (LONG, ["mat", "dog"], ["cat", "dog", "mat", "zebra"], {2: 2, **{5 + 3 * i: 0 for i in range(24)}}),
  # a later drawn noun overwrites an earlier one where their runs overlap
  ("a red circle and a circle on a grey background", ["circle", "red circle"],
   ["circle", "grey background", "red circle"], {2: 2, 3: 2, 6: 1, 9: 0, 10: 0}),
  ("a dog", ["", ""], [], {}),  # the padding a batch's end marker gets
  ("a café in Paris", ["Paris", "café"], ["Paris", "café"], {2: 2, 4: 1}),
  ("flags of the U.S. and Canada", ["U.S.", "Canada"], ["Canada", "U.S.", "flags"],
   {1: 0, 4: 1, 5: 1, 6: 1, 7: 1, 9: 2}),
]  # fmt: skip


def _dense(sparse, n=77):
  out = np.full(n, -1, np.int32)
  for i, v in sparse.items():
    out[i] = v
  return out


def test_word_labels_match_the_authors():
  for caption, drawn, all_nouns, expected in LABEL_CASES:
    got = nouns.word_labels(tokenizer.tokenize(caption)[0], drawn, all_nouns)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, _dense(expected), err_msg=caption)


@pytest.mark.skipif(
  not AUTHORS or not os.path.isdir(AUTHORS),
  reason="no checkout of the CoDe authors' code (set TCL_JAX_CODE_REPO)",
)
def test_our_token_ids_are_the_authors_sclip_ids():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "authors_simple_tokenizer", os.path.join(AUTHORS, "sclip", "simple_tokenizer.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  theirs = mod.SimpleTokenizer()
  for caption, drawn, all_nouns, _ in LABEL_CASES:
    for text in [caption, *drawn, *all_nouns]:
      assert list(nouns._bpe(text)) == theirs.encode(text), text


def test_code_text_keys():
  caps = ["a red circle and a blue square", "the cat sat on the cat mat"]
  drawn = [["blue square", "red circle"], ["cat", "mat"]]
  all_nouns = [["blue square", "red circle"], ["cat", "mat"]]
  templates = np.array([[0, 79], [39, 39]])
  out = nouns.code_text(tokenizer.tokenize(caps), drawn, templates, all_nouns)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
    "noun_tokens": ((2, 2, 60), np.int32),
    "kg_tokens": ((2, 2, 77), np.int32),
    "word_labels": ((2, 77), np.int32),
  }
  # the prompter's tokens: tokenize(noun, 61) without its SOT
  np.testing.assert_array_equal(out["noun_tokens"][1, 0, :3], [2368, 49407, 0])  # cat, EOT
  np.testing.assert_array_equal(
    out["noun_tokens"].reshape(4, 60), tokenizer.tokenize(sum(drawn, []), 61)[:, 1:]
  )
  kg = ["a bad photo of a blue square.", "a tattoo of the red circle.", "a photo of a cat.",
        "a photo of a mat."]  # fmt: skip
  np.testing.assert_array_equal(out["kg_tokens"].reshape(4, 77), tokenizer.tokenize(kg))
  np.testing.assert_array_equal(out["word_labels"][1], _dense({2: 1, 6: 1, 7: 2}))


def test_full_imagenet_templates():
  full = prompts.get_templates("full")  # the authors' datasets/templates.py name
  assert len(full) == 80 and len(set(full)) == 80
  assert full[0] == "a bad photo of a {}." and full[-1] == "a tattoo of the {}."
  assert full[39] == "a photo of a {}." and full[44] == "a origami {}."
  assert all(t.count("{}") == 1 for t in full)
  assert nouns.full_imagenet_templates() == full


# ---------------------------------------------------------------------------------------------
# The input pipeline's CoDe batches
# ---------------------------------------------------------------------------------------------


def _iter(files, **kw):
  args = dict(
    global_batch_size=2,
    seed=0,
    image_size=16,
    process_index=0,
    process_count=1,
    shuffle_buffer=64,
    num_epochs=1,
    with_keys=True,
    augment=False,
  )
  args.update(kw)
  return make_train_iterator(files, **args)


# key -> (caption, nouns); k10 has one noun, k11 none: dropped from CoDe batches of 2 nouns.
RECORDS = {
  "k00": ("the cat sat on the cat mat", ["cat", "mat"]),
  "k01": ("a red circle and a circle on a grey background",
          ["circle", "grey background", "red circle"]),
  "k02": ("skateboarders and boarders at the skate park",
          ["boarders", "park", "skate", "skateboarders"]),
  "k03": ("a dog and a cat sitting on a couch in the living room",
          ["cat", "couch", "dog", "living", "room"]),
  "k04": ("birds in the sky", ["birds", "sky"]),
  "k05": ("a man with dogs and Cats in New York", ["Cats", "New", "York", "dogs", "man"]),
  "k06": ("a café in Paris", ["Paris", "café"]),
  "k07": ("flags of the U.S. and Canada", ["Canada", "U.S.", "flags"]),
  "k08": (LONG, ["cat", "dog", "mat"]),
  "k09": ("vitamin c and vitamin d in a glass", ["glass", "vitamin"]),
  "k10": ("a lonely tree", ["tree"]),
  "k11": ("nothing", []),
}  # fmt: skip


def _write(path, recs, with_nouns=True):
  with schema.ShardWriter(str(path)) as w:
    for i, (key, (caption, nn)) in enumerate(recs.items()):
      w.write(
        schema.make_example(_png(i * 7 % 256), caption, key, nouns=nn if with_nouns else None)
      )
  return str(path)


@pytest.fixture(scope="module")
def code_records(tmp_path_factory):
  d = tmp_path_factory.mktemp("code")
  return _write(d / schema.shard_name(0, 1), RECORDS), _write(d / "old.tfrecord", RECORDS, False)


def _drawn(row_tokens, candidates):
  """The nouns whose prompter tokens a batch row holds (each must match exactly one)."""
  cand = tokenizer.tokenize(candidates, 61)[:, 1:]
  out = []
  for t in row_tokens:
    hit = [c for c, ct in zip(candidates, cand) if np.array_equal(ct, t)]
    assert len(hit) == 1, (t, candidates)
    out.append(hit[0])
  return out


def test_code_batches(code_records):
  path, _ = code_records
  it = _iter([path], num_nouns=2)
  seen = []
  full = prompts.get_templates("full")
  for b in it:
    assert {k: (v.shape, v.dtype) for k, v in b.items() if k != "key"} == {
      "image": ((2, 16, 16, 3), np.float32),
      "text_tokens": ((2, 77), np.int32),
      "noun_tokens": ((2, 2, 60), np.int32),
      "kg_tokens": ((2, 2, 77), np.int32),
      "word_labels": ((2, 77), np.int32),
    }
    for j, key in enumerate(k.decode() for k in b["key"]):
      caption, all_nouns = RECORDS[key]
      seen.append(key)
      np.testing.assert_array_equal(b["text_tokens"][j], tokenizer.tokenize(caption)[0])
      drawn = _drawn(b["noun_tokens"][j], all_nouns)
      assert len(set(drawn)) == 2
      for n, kg in zip(drawn, b["kg_tokens"][j]):
        assert any(np.array_equal(kg, t) for t in tokenizer.tokenize([t.format(n) for t in full]))
      np.testing.assert_array_equal(
        b["word_labels"][j], nouns.word_labels(b["text_tokens"][j], drawn, all_nouns)
      )
  assert sorted(seen) == [f"k{i:02d}" for i in range(10)]  # k10, k11: too few nouns
  assert it.counters() == {
    "bad_record": 0,
    "empty_caption": 0,
    "missing_image": 0,
    "corrupt_image": 0,
    "bad_shard": 0,
    "too_few_nouns": 2,
    "unreadable_shard": 0,
  }


def test_code_batches_of_three_nouns_drop_more(code_records):
  path, _ = code_records
  it = _iter([path], num_nouns=3, global_batch_size=1, shuffle_buffer=1)
  keys = [b["key"][0].decode() for b in it]
  assert keys == [k for k, (_, nn) in RECORDS.items() if len(nn) >= 3]
  assert it.counters()["too_few_nouns"] == sum(len(nn) < 3 for _, nn in RECORDS.values()) == 6


def _same_nouns_records(path, n=24):
  caption = "a bird a cat a dog a fish and a horse"
  recs = {f"s{i:02d}": (caption, ["bird", "cat", "dog", "fish", "horse"]) for i in range(n)}
  return _write(path, recs)


def test_draws_are_per_example_deterministic_and_resumable(tmp_path):
  path = _same_nouns_records(tmp_path / "same.tfrecord")
  kw = dict(num_nouns=2, global_batch_size=4, num_epochs=2, augment=PLAIN)
  ref = _iter([path], **kw)
  batches = list(ref)
  assert len(batches) == 12
  again = list(_iter([path], **kw))
  for a, b in zip(batches, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # The same nouns in every record, yet the draws differ from example to example.
  rows = [
    (b["noun_tokens"][j].tobytes(), b["kg_tokens"][j].tobytes()) for b in batches for j in range(4)
  ]
  assert len(set(rows)) > 40
  assert len({r[0] for r in rows}) >= 10  # of the 20 ordered pairs of 5 nouns
  # Resumed after batch 5 (epoch 0), the iterator draws what the uninterrupted one drew.
  it = _iter([path], **kw)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = _iter([path], **kw)
  resumed.set_state(state)
  for want, got in zip(batches[5:], resumed):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  # Another seed draws otherwise.
  other = next(_iter([path], **dict(kw, seed=1)))
  assert not np.array_equal(other["noun_tokens"], batches[0]["noun_tokens"])


def test_draw_nouns_is_a_uniform_permutation_and_template_choice():
  import tensorflow as tf

  from tcl_jax.data import records

  words = tf.constant([b"bird", b"cat", b"dog"])
  seeds = tf.data.Dataset.range(3000).map(lambda i: tf.stack([i, 7 * i]))
  ds = seeds.map(lambda s: records.draw_nouns(words, s, 2, 80))
  drawn, templates = zip(*((d.tolist(), t.tolist()) for d, t in ds.as_numpy_iterator()))
  firsts = np.unique([d[0] for d in drawn], return_counts=True)[1]
  assert len(firsts) == 3 and firsts.min() > 850 and firsts.max() < 1150, firsts
  assert all(d[0] != d[1] for d in drawn)
  counts = np.bincount(np.ravel(templates), minlength=80)
  assert len(counts) == 80 and counts.min() > 30, counts  # 6000 draws over 80
  first, _ = next(ds.as_numpy_iterator())
  again, _ = next(seeds.map(lambda s: records.draw_nouns(words, s, 2, 80)).as_numpy_iterator())
  np.testing.assert_array_equal(first, again)
  # fewer nouns than asked for (a batch's end marker): padded with b""
  short, _ = records.draw_nouns(tf.constant([b"x"]), tf.constant([1, 2], tf.int64), 2, 80)
  assert short.numpy().tolist() == [b"x", b""]


def test_code_batch_images_and_tokens_are_tcls(tmp_path):
  # None dropped: the CoDe batches' images (random crops and flips) and caption tokens are
  # exactly the TCL batches' (the noun draws use their own stream of the example's seed).
  path = _same_nouns_records(tmp_path / "same.tfrecord", n=8)
  kw = dict(global_batch_size=4, augment=PLAIN)
  for tcl, code in zip(_iter([path], **kw), _iter([path], num_nouns=2, **kw)):
    for k in ("image", "text_tokens", "key"):
      np.testing.assert_array_equal(tcl[k], code[k])


def test_tcl_batches_do_not_read_nouns(code_records):
  path, old = code_records
  kw = dict(global_batch_size=3, augment=PLAIN)
  new_batches, old_batches = list(_iter([path], **kw)), list(_iter([old], **kw))
  assert len(new_batches) == 4
  for a, b in zip(new_batches, old_batches):
    assert set(a) == {"image", "text_tokens", "key"}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  it = _iter([path], **kw)
  list(it)
  assert "too_few_nouns" not in it.counters()  # TCL's counters as they were


def test_records_without_nouns(code_records):
  from tcl_jax.train import inputs

  _, old = code_records
  with pytest.raises(ValueError, match=r"12 too_few_nouns \(CoDe batches take records with >= 2"):
    next(_iter([old], num_nouns=2))
  with pytest.raises(ValueError) as e:
    inputs.check_nouns_stored([old], 2, "FIX")
  assert str(e.value) == (
    f"config.input.num_nouns=2 (CoDe batches) needs records with their captions' nouns, and "
    f"{old} has none: FIX"
  )
  inputs.check_nouns_stored([code_records[0]], 2, "FIX")  # records with nouns pass


def test_num_nouns_config_value():
  import ml_collections

  from tcl_jax.cli import config_checks
  from tcl_jax.train import inputs

  config = ml_collections.ConfigDict(dict(total_steps=1, input=dict(image_size=8, num_nouns=-1)))
  assert config_checks.value_problem(config) == (
    "config.input.num_nouns must be a whole number >= 0, got -1"
  )
  config.input.num_nouns = 2
  assert config_checks.value_problem(config) is None and inputs.num_nouns(config) == 2
  del config.input["num_nouns"]
  assert inputs.num_nouns(config) == 0


# ---------------------------------------------------------------------------------------------
# The synthetic world's nouns, and the in-memory batches
# ---------------------------------------------------------------------------------------------


def test_synthetic_scenes_name_their_nouns():
  many = 0
  for i in range(600):
    plain = synthetic.scene(0, synthetic.STREAM_TRAIN, i, size=32)
    rgb, label, objects, caption, nn = synthetic.scene(
      0, synthetic.STREAM_TRAIN, i, size=32, with_nouns=True
    )
    # the same scene and caption (TCL's data does not move)
    np.testing.assert_array_equal(plain[0], rgb)
    np.testing.assert_array_equal(plain[1], label)
    assert plain[2] == objects and plain[3] == caption
    assert nn == sorted(set(nn)) and nn
    for n in nn:
      assert f" {n}" in f" {caption}", (n, caption)
      assert (
        n.endswith(" background")
        or n in objects
        or n in synthetic.SHAPES
        or n in synthetic.TEMPLATE_NOUNS
      )
    bg = [n for n in nn if n.endswith(" background")]
    assert len(bg) == (" background" in caption)
    many += len(nn) >= 2
  assert 0.75 < many / 600 < 0.9  # most captions can make a CoDe example of 2 nouns


def test_synthetic_records_carry_nouns_and_tcl_batches_do_not_move(tmp_path):
  import tensorflow as tf

  kw = dict(num_examples=24, image_size=24, num_shards=2, seed=4)
  new = synthetic.write_synthetic_image_text(str(tmp_path / "new"), **kw)
  old = synthetic.write_synthetic_image_text(str(tmp_path / "old"), with_nouns=False, **kw)
  spec = schema.parse_spec(with_nouns=True)
  for f in new:
    for r in tf.data.TFRecordDataset(f):
      ex = tf.io.parse_single_example(r, spec)
      i = int(ex["key"].numpy().decode().split("-")[1])
      want = synthetic.scene(4, synthetic.STREAM_TRAIN, i, size=24, with_nouns=True)[4]
      assert [n.decode() for n in tf.sparse.to_dense(ex["nouns"]).numpy()] == want
  it = dict(global_batch_size=4, image_size=24, augment=PLAIN)
  for a, b in zip(_iter(new, **it), _iter(old, **it)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  code = _iter(new, num_nouns=2, **it)
  n = sum(b["image"].shape[0] for b in code)
  dropped = code.counters()["too_few_nouns"]
  assert n + dropped in (21, 22, 23, 24) and dropped > 0  # a partial last batch is dropped


def test_in_memory_code_batches():
  kw = dict(global_batch_size=4, image_size=8, seed=3)
  tcl, code = in_memory.InMemoryIterator(**kw), in_memory.InMemoryIterator(num_nouns=2, **kw)
  for _ in range(3):
    a, b = next(tcl), next(code)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    assert {k: v.shape for k, v in b.items() if k not in a} == {
      "noun_tokens": (4, 2, 60),
      "kg_tokens": (4, 2, 77),
      "word_labels": (4, 77),
    }
    assert ((b["word_labels"] == 1).any(1) & (b["word_labels"] == 2).any(1)).all()
  assert in_memory.NOUNS[0] == ["dog", "photo"] and in_memory.NOUNS[9] == ["blue", "car", "photo"]
  with pytest.raises(ValueError, match="2 nouns per caption, fewer than num_nouns=3"):
    in_memory.InMemoryIterator(num_nouns=3, **kw)
