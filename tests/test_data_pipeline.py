"""Input pipeline: round trip, bad data counting, determinism, host sharding, resume."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import io  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import pytest  # noqa: E402

from tcl_jax.data import schema  # noqa: E402
from tcl_jax.data import synthetic  # noqa: E402
from tcl_jax.data.augment import IMAGENET_MEAN  # noqa: E402
from tcl_jax.data.augment import IMAGENET_STD  # noqa: E402
from tcl_jax.data.augment import AugmentConfig  # noqa: E402
from tcl_jax.data.input_pipeline import make_train_iterator  # noqa: E402
from tcl_jax.data.synthetic import write_synthetic_image_text  # noqa: E402
from tcl_jax.tokenizer import tokenize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

PLAIN = AugmentConfig(deit_aug=False)  # random crop + flip only: cheap to trace


def _png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def _iter(files, **kw):
  args = dict(
    global_batch_size=4,
    seed=0,
    image_size=32,
    process_index=0,
    process_count=1,
    shuffle_buffer=64,
    num_epochs=1,
    with_keys=True,
    augment=False,
  )
  args.update(kw)
  return make_train_iterator(files, **args)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  d = tmp_path_factory.mktemp("synth")
  return write_synthetic_image_text(str(d), num_examples=48, image_size=48, num_shards=4, seed=3)


def test_synthetic_files_and_captions(synth):
  import tensorflow as tf

  assert [os.path.basename(f) for f in synth] == [
    f"train-0000{i}-of-00004.tfrecord" for i in range(4)
  ]
  recs = [
    tf.io.parse_single_example(r, schema.parse_spec())
    for f in synth
    for r in tf.data.TFRecordDataset(f)
  ]
  assert len(recs) == 48
  assert recs[0]["key"].numpy() == b"synth-00000000"
  caps = [r["caption"].numpy().decode() for r in recs]
  # shapes world: each caption names an object by colour and shape, or by shape alone
  names = synthetic.CLASSES[1:] + synthetic.SHAPES
  assert all(any(f"a {o}" in c for o in names) for c in caps)
  img = np.asarray(Image.open(io.BytesIO(recs[5]["image"].numpy())))
  assert img.shape == (48, 48, 3)
  with open(synth[0] + schema.STATS_SUFFIX) as f:
    assert json.load(f) == {"written": 12, "skipped": {}}


def test_round_trip_pixels_and_tokens(tmp_path):
  rng = np.random.default_rng(0)
  arrs, caps = {}, {}
  path = str(tmp_path / schema.shard_name(0, 1))
  with schema.ShardWriter(path) as w:
    for i in range(8):
      key = f"k{i}"
      arrs[key] = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
      caps[key] = f"a photo number {i} of a cat"
      w.write(schema.make_example(_png(arrs[key]), caps[key], key))
  it = _iter([path], global_batch_size=8)
  b = next(it)
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["text_tokens"].shape == (8, 77) and b["text_tokens"].dtype == np.int32
  keys = [k.decode() for k in b["key"]]
  assert sorted(keys) == sorted(arrs)
  mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
  for j, k in enumerate(keys):
    np.testing.assert_allclose(b["image"][j] * std + mean, arrs[k], atol=1e-3)
    np.testing.assert_array_equal(b["text_tokens"][j], tokenize([caps[k]])[0])
  assert b["text_tokens"][0][0] == 49406
  with pytest.raises(StopIteration):
    next(it)


def test_tokens_from_record_match_pipeline_tokens(tmp_path):
  path = str(tmp_path / schema.shard_name(0, 1))
  caps = [f"{n} dogs playing in the snow" for n in ("two", "three", "four", "five")]
  with schema.ShardWriter(path) as w:
    for i, c in enumerate(caps):
      w.write(
        schema.make_example(
          _png(np.full((32, 32, 3), i, np.uint8)), c, f"k{i}", tokens=tokenize([c])[0]
        )
      )
  a = next(_iter([path], shuffle_buffer=1))
  b = next(_iter([path], shuffle_buffer=1, tokens_from_record=True))
  np.testing.assert_array_equal(a["text_tokens"], b["text_tokens"])
  np.testing.assert_array_equal(a["text_tokens"], tokenize(caps))


def _no_image_example(key):
  """An Example without the image feature at all (not just empty bytes)."""
  import tensorflow as tf

  feats = {
    k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
    for k, v in ((schema.CAPTION, b"a caption"), (schema.KEY, key.encode()))
  }
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


@pytest.fixture
def bad_mix(tmp_path):
  """(files, good keys, per-epoch counters, named bad data): one shard with every kind of bad
  record, a truncated one and a missing one."""
  good = _png(np.zeros((32, 32, 3), np.uint8))
  p1 = str(tmp_path / "a.tfrecord")
  with schema.ShardWriter(p1) as w:
    for i in range(5):
      w.write(schema.make_example(good, f"good {i}", f"a{i}"))
    w.write(schema.make_example(b"\xff\xd8not really a jpeg", "corrupt", "bad-img"))
    w.write(schema.make_example(b"garbage", "corrupt png", "bad-img2"))
    w.write(schema.make_example(good, "   ", "empty-cap"))
    w.write(b"this is not a tf.Example proto \x00\x01")  # valid framing, bad payload
    w.write(schema.make_example(good, "good 5", "a5"))
    w.write(schema.make_example(b"", "empty image", "no-img"))
    w.write(_no_image_example("no-img-feature"))
  p2 = str(tmp_path / "b.tfrecord")
  with schema.ShardWriter(p2) as w:
    for i in range(3):
      w.write(schema.make_example(good, f"good b{i}", f"b{i}"))
  data = open(p2, "rb").read()
  with open(p2, "wb") as f:
    f.write(data[:-10])  # truncate the last record
  missing = str(tmp_path / "c.tfrecord")
  counts = {
    "bad_record": 1,
    "empty_caption": 1,
    "missing_image": 2,
    "corrupt_image": 2,
    "bad_shard": 1,
    "unreadable_shard": 1,
  }
  named = {
    ("corrupt_image", p1, "key 'bad-img'"),
    ("corrupt_image", p1, "key 'bad-img2'"),
    ("empty_caption", p1, "key 'empty-cap'"),
    ("missing_image", p1, "key 'no-img'"),
    ("missing_image", p1, "key 'no-img-feature'"),
    ("bad_record", p1, "record 8 (counting from 0)"),  # no key: its number in the file
    ("bad_shard", p2, ""),
    ("unreadable_shard", missing, ""),
  }
  keys = ["a0", "a1", "a2", "a3", "a4", "a5", "b0", "b1"]
  return [p1, p2, missing], keys, counts, named


def test_bad_data_is_skipped_and_counted(bad_mix):
  files, good, counts, _ = bad_mix
  it = _iter(files, global_batch_size=1)
  keys = sorted(b["key"][0].decode() for b in it)
  assert keys == good
  assert it.counters() == counts


def test_bad_data_with_batches_and_counters_restored(bad_mix):
  files, good, counts, _ = bad_mix
  kw = dict(global_batch_size=4, num_epochs=2, seed=1)
  ref = _iter(files, **kw)
  batches = [next(ref) for _ in range(3)]  # the 2 batches of epoch 0, the first of epoch 1
  assert [b["image"].shape[0] for b in batches] == [4, 4, 4]
  assert sorted(k.decode() for b in batches[:2] for k in b["key"]) == good
  state = json.loads(json.dumps(ref.get_state()))
  # epoch 0's counts are complete; epoch 1's so far are in too
  assert state["epoch"] == 1 and all(state["counts"][r] >= n for r, n in counts.items())
  last = next(ref)
  with pytest.raises(StopIteration):
    next(ref)
  assert ref.counters() == {r: 2 * n for r, n in counts.items()}

  it = _iter(files, **kw)
  it.set_state(state)
  assert it.counters() == state["counts"]  # restored before any batch is read
  resumed = list(it)
  assert len(resumed) == 1
  np.testing.assert_array_equal(resumed[0]["key"], last["key"])
  assert it.counters() == {r: 2 * n for r, n in counts.items()}


def test_bad_data_is_named_once_with_its_file_and_key(bad_mix, caplog, monkeypatch):
  from tcl_jax.data import records

  files, good, counts, named = bad_mix
  monkeypatch.setattr(records, "BAD_DATA_LOG", records.BadDataLog(burst=100))
  caplog.set_level("WARNING")
  it = _iter(files, global_batch_size=2, num_epochs=3)
  assert len(list(it)) == 3 * len(good) // 2
  assert it.counters() == {r: 3 * n for r, n in counts.items()}
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("input: ")]
  # Three epochs, yet each bad record / shard is named once.
  assert len(lines) == len(named), lines
  got = set()
  for line in lines:
    reason, rest = line[len("input: ") :].split(": ", 1)
    path, _, which = rest.partition(", ")
    got.add((reason, path, which))
  assert got == named


def test_bad_data_log_is_rate_limited(caplog):
  import time

  from tcl_jax.data.records import BadDataLog

  caplog.set_level("WARNING")
  # A period far longer than the few microseconds the reports below take, even on a loaded
  # machine; the new window is then waited for on the clock the log reads, not guessed.
  period = 3.0
  log = BadDataLog(burst=2, period=period)
  t0 = time.monotonic()
  for i in range(5):
    log.report("corrupt_image", "/d/x.tfrecord", f"key 'k{i}'")
  log.report("corrupt_image", "/d/x.tfrecord", "key 'k0'")  # named already: never again
  assert time.monotonic() - t0 < period  # all six in the first window
  assert [r.getMessage() for r in caplog.records] == [
    "input: corrupt_image: /d/x.tfrecord, key 'k0'",
    "input: corrupt_image: /d/x.tfrecord, key 'k1'",
  ]
  while time.monotonic() < t0 + period + 0.05:  # a new window: the next line says what the
    time.sleep(0.1)  # last one held back
  log.report("bad_shard", "/d/y.tfrecord")
  assert caplog.records[-1].getMessage() == (
    "input: bad_shard: /d/y.tfrecord [3 more bad records/files not named: rate limit]"
  )


def test_no_usable_record_in_a_full_pass_raises_naming_the_files(tmp_path):
  paths = []
  for s in range(2):
    paths.append(str(tmp_path / f"bad{s}.tfrecord"))
    with schema.ShardWriter(paths[-1]) as w:
      for i in range(8):
        w.write(schema.make_example(b"\x00not an image", f"cap {i}", f"k{s}{i}"))
  for epochs in (1, None):  # endless iteration used to restart epochs forever
    it = _iter(paths, num_epochs=epochs)
    with pytest.raises(ValueError) as e:
      next(it)
    assert str(e.value) == (
      f"input: no usable example in a full pass over 2 files "
      f"({paths[0]}, {paths[1]}): 16 corrupt_image"
    )
  # Good records, but fewer than one batch: no batch can ever be made either.
  with schema.ShardWriter(paths[0]) as w:
    for i in range(3):
      w.write(schema.make_example(_png(np.zeros((8, 8, 3), np.uint8)), "ok", f"g{i}"))
  with pytest.raises(
    ValueError,
    match=r"only 3 usable examples, fewer than one batch of 4, "
    r"in a full pass over 2 files .*: 8 corrupt_image",
  ):
    next(_iter(paths))


def test_determinism_same_seed_same_batches(synth):
  kw = dict(image_size=48, augment=AugmentConfig(re_prob=1.0))  # every DeiT option exercised
  a, b, c = (_iter(synth, seed=s, **kw) for s in (7, 7, 8))
  for _ in range(2):
    x, y, z = next(a), next(b), next(c)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["text_tokens"], y["text_tokens"])
    assert list(x["key"]) == list(y["key"])
    assert list(x["key"]) != list(z["key"]) or not np.array_equal(x["image"], z["image"])
  assert np.isfinite(x["image"]).all() and x["image"].shape == (4, 48, 48, 3)


def test_hosts_see_disjoint_complete_shards(synth):
  seen = []
  for pi in (0, 1):
    it = _iter(synth, global_batch_size=4, process_index=pi, process_count=2)
    keys = [k.decode() for b in it for k in b["key"]]
    assert len(keys) == 24  # 2 of 4 shards, 12 pairs each, batches of 2 per host
    seen.append(set(keys))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {f"synth-{i:08d}" for i in range(48)}


def test_resume_mid_epoch_and_across_epochs(synth):
  kw = dict(global_batch_size=8, augment=PLAIN, image_size=32, num_epochs=2, seed=5)
  ref = _iter(synth, **kw)
  batches = [next(ref) for _ in range(3)]
  state = ref.get_state()
  assert state["epoch"] == 0 and 0 < state["position"] <= 48 + 4
  json.dumps(state)
  rest = list(ref)  # 48 / 8 = 6 per epoch: 3 + 9 remaining
  assert len(rest) == 9

  it = _iter(synth, **kw)
  it.set_state(json.loads(json.dumps(state)))
  resumed = list(it)
  assert len(resumed) == 9
  for x, y in zip(rest, resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["key"], y["key"])
    np.testing.assert_array_equal(x["text_tokens"], y["text_tokens"])
  # epochs differ in order, and the whole epoch covers every key once
  epoch1 = [k for b in rest[3:] for k in b["key"]]
  epoch0 = [k for b in batches + rest[:3] for k in b["key"]]
  assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 48
  assert epoch0 != epoch1
  assert it.get_state()["epoch"] == 2
