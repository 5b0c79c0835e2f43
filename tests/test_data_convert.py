"""Converter: webdataset / csv / tfds sources, skip counting, resumability."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import io  # noqa: E402
import json  # noqa: E402
import tarfile  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import pytest  # noqa: E402

from tcl_jax.data import convert  # noqa: E402


def _img(fmt, value, size=(20, 16)):
  buf = io.BytesIO()
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, fmt)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _read(out_dir):
  import tensorflow as tf

  files = sorted(f for f in os.listdir(out_dir) if f.endswith(".tfrecord"))
  recs = []
  for f in files:
    for r in tf.data.TFRecordDataset(os.path.join(out_dir, f)):
      ex = tf.train.Example.FromString(r.numpy()).features.feature
      recs.append(
        {
          k: (v.bytes_list.value[0] if v.bytes_list.value else list(v.int64_list.value))
          for k, v in ex.items()
        }
      )
  return files, recs


def _run(capsys, argv):
  assert convert.main(argv) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_expand_braces():
  assert convert.expand_braces("/d/{00008..00011}.tar") == [
    "/d/00008.tar",
    "/d/00009.tar",
    "/d/00010.tar",
    "/d/00011.tar",
  ]
  assert convert.expand_braces("x{a,b}{1..2}") == ["xa1", "xa2", "xb1", "xb2"]


def test_webdataset_jpg_txt_png_json(tmp_path, capsys):
  src = tmp_path / "wds"
  src.mkdir()
  with tarfile.open(src / "00000.tar", "w") as t:
    _add(t, "000000000.jpg", _img("JPEG", 10))
    _add(t, "000000000.txt", b"a dark square")
    _add(t, "000000000.json", json.dumps({"caption": "ignored, txt wins"}).encode())
    _add(t, "000000001.png", _img("PNG", 200))
    _add(
      t, "000000001.json", json.dumps({"caption": "a bright square", "url": "http://x/1"}).encode()
    )
    _add(t, "000000002.jpg", b"\xff\xd8corrupt")
    _add(t, "000000002.txt", b"corrupt image")
    _add(t, "000000003.jpg", _img("JPEG", 50))
    _add(t, "000000003.txt", b"  ")
    _add(t, "000000004.jpg", _img("JPEG", 60))  # no caption member
    _add(t, "000000005.txt", b"no image member")
  with tarfile.open(src / "00001.tar", "w") as t:
    _add(t, "000010000.webp", _img("WEBP", 90))
    _add(t, "000010000.txt", b"a webp image")
  good = open(src / "00001.tar", "rb").read()
  (src / "00002.tar").write_bytes(good[:700])  # truncated mid-member
  out = tmp_path / "out"
  summary = _run(
    capsys,
    [
      "webdataset",
      str(src / "{00000..00003}.tar"),
      "--output",
      str(out),
      "--num-shards",
      "2",
      "--workers",
      "1",
    ],
  )
  assert summary == {
    "written": 3,
    "skipped": {
      "corrupt_image": 1,
      "empty_caption": 1,
      "missing_image": 1,
      "missing_caption": 1,
      "unreadable_input": 2,
    },
  }  # 00002 truncated, 00003 missing
  files, recs = _read(out)
  assert files == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  by_key = {r["key"]: r for r in recs}
  assert sorted(by_key) == [b"000000000", b"000000001", b"000010000"]
  assert by_key[b"000000000"]["caption"] == b"a dark square"
  assert by_key[b"000000001"]["caption"] == b"a bright square"
  assert by_key[b"000000001"]["url"] == b"http://x/1"
  assert by_key[b"000000001"]["image"][:4] == b"\x89PNG"  # stored as-is
  assert by_key[b"000010000"]["image"][:2] == b"\xff\xd8"  # webp re-encoded to JPEG
  assert by_key[b"000000000"]["width"] == [20] and by_key[b"000000000"]["height"] == [16]


def test_csv_relative_paths_and_resume(tmp_path, capsys):
  (tmp_path / "imgs").mkdir()
  rows = ["filepath\tcaption"]
  for i in range(6):
    (tmp_path / "imgs" / f"{i}.png").write_bytes(_img("PNG", i * 30))
    rows.append(f"imgs/{i}.png\tpicture {i}")
  rows.append("imgs/missing.png\tno file")
  (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
  out = tmp_path / "out"
  argv = [
    "csv",
    str(tmp_path / "pairs.tsv"),
    "--output",
    str(out),
    "--num-shards",
    "3",
    "--workers",
    "1",
    "--tokenize",
  ]
  summary = _run(capsys, argv)
  assert summary["written"] == 6 and summary["skipped"]["missing_image"] == 1
  files, recs = _read(out)
  assert len(files) == 3
  assert [r["caption"] for r in recs] == [f"picture {i}".encode() for i in range(6)]
  from tcl_jax.tokenizer import tokenize

  assert recs[2]["tokens"] == tokenize(["picture 2"])[0].tolist()

  # resume: delete one shard; only it is rewritten, totals unchanged
  mtime = os.path.getmtime(out / files[0])
  os.remove(out / files[1])
  assert _run(capsys, argv) == summary
  assert os.path.getmtime(out / files[0]) == mtime
  assert len(_read(out)[1]) == 6
  assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_tfds_local_dataset(tmp_path, capsys):
  import tensorflow_datasets as tfds  # pinned in requirements.txt

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(encoding_format="png"),
            "image/id": np.int64,
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          }
        )
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        caps = [f"caption {i} a", f"caption {i} b"] if i != 3 else [""]
        yield (
          i,
          {
            "image": np.full((8, 8, 3), i * 40, np.uint8),
            "image/id": 100 + i,
            "captions": {"text": caps},
          },
        )

  data_dir = str(tmp_path / "tfds")
  TinyCaptions(data_dir=data_dir).download_and_prepare()  # a local builder: no network
  out = tmp_path / "out"
  summary = _run(
    capsys,
    [
      "tfds",
      "tiny_captions",
      "--data-dir",
      data_dir,
      "--output",
      str(out),
      "--num-shards",
      "2",
      "--workers",
      "1",
    ],
  )
  assert summary["written"] == 4 and summary["skipped"]["empty_caption"] == 1
  _, recs = _read(out)
  assert sorted((r["key"], r["caption"]) for r in recs) == [
    (b"100", b"caption 0 a"),
    (b"101", b"caption 1 a"),
    (b"102", b"caption 2 a"),
    (b"104", b"caption 4 a"),
  ]
  assert recs[0]["image"][:4] == b"\x89PNG"

  capsys.readouterr()
  assert (
    convert.main(
      ["tfds", "tiny_captions", "--data-dir", str(tmp_path / "empty"), "--output", str(out)]
    )
    == 2
  )
  assert "not prepared" in capsys.readouterr().err


def test_cli_usage_mistakes_end_in_one_line_with_status_2(tmp_path):
  import subprocess
  import sys

  for argv in (
    ["csv", str(tmp_path / "nosuch.csv")],
    ["webdataset", str(tmp_path / "nothing-*.tar")],
  ):
    r = subprocess.run(
      [sys.executable, "-m", "tcl_jax.data.convert", *argv, "--output", str(tmp_path / "out")],
      capture_output=True,
      text=True,
      timeout=300,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def _cli(*argv):
  import subprocess
  import sys

  return subprocess.run(
    [sys.executable, "-m", "tcl_jax.data.convert", *argv],
    capture_output=True,
    text=True,
    timeout=300,
  )


def _one_error_line(r):
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr and r.stdout == ""
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  return lines[0]


def test_cli_argparse_mistakes_are_one_line_and_help_still_works(tmp_path):
  # Was: argparse's 5-6 line usage block.
  prog = "python -m tcl_jax.data.convert"
  assert _one_error_line(_cli("csv", "x.csv")) == (
    f"error: the following arguments are required: --output (see: {prog} --help)"
  )
  assert _one_error_line(_cli("parquet", "x", "--output", str(tmp_path))) == (
    "error: argument source: invalid choice: 'parquet' (choose from 'webdataset', 'csv', "
    f"'tfds') (see: {prog} --help)"
  )
  for value, why in (
    ("0", "must be >= 1, got 0"),
    ("ten", "expected a whole number >= 1, got 'ten'"),
  ):
    assert _one_error_line(
      _cli("csv", "x.csv", "--output", str(tmp_path), "--num-shards", value)
    ) == (f"error: argument --num-shards: {why} (see: {prog} --help)")
  r = _cli("--help")
  assert r.returncode == 0 and r.stdout.startswith(f"usage: {prog}")


def test_cli_webdataset_braces_matching_no_file(tmp_path):
  # Was: exit 0 and four empty shards, "unreadable_input": 4 naming nothing.
  pattern = str(tmp_path / "{00000..00003}.tar")
  out = tmp_path / "out"
  assert _one_error_line(_cli("webdataset", pattern, "--output", str(out))) == (
    f"error: no input matches {pattern!r}"
  )
  assert not out.exists()


def test_cli_unknown_tfds_dataset_is_one_line(tmp_path):
  # Was: the whole tfds catalogue (462 lines).
  line = _one_error_line(_cli("tfds", "no_such_dataset", "--output", str(tmp_path / "o")))
  assert line == (
    "error: tfds dataset 'no_such_dataset' not found (DatasetNotFoundError: "
    "Dataset no_such_dataset not found.); give a tfds name, prepared in --data-dir"
  )


def test_cli_read_only_output(tmp_path):
  # Was: a traceback. Root ignores permissions: chattr +i makes the directory read-only.
  import shutil
  import subprocess

  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "0.png").write_bytes(_img("PNG", 0))
  (tmp_path / "pairs.csv").write_text("filepath,caption\nimgs/0.png,a picture\n")
  ro = tmp_path / "ro"
  ro.mkdir()
  if os.geteuid() == 0:
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(ro)]).returncode:
      pytest.skip("running as root without chattr +i: no directory is read-only")
  else:
    ro.chmod(0o555)
  try:
    for out in (ro, ro / "sub"):
      line = _one_error_line(_cli("csv", str(tmp_path / "pairs.csv"), "--output", str(out)))
      assert line.startswith(f"error: --output={out} is not writable ("), line
      assert line.endswith("); give a directory you can write to")
  finally:
    if os.geteuid() == 0:
      subprocess.run(["chattr", "-i", str(ro)], check=True)
    ro.chmod(0o755)


def test_cli_workers_print_no_start_up_noise(tmp_path):
  # Was: TensorFlow's oneDNN / CPU-feature notices, repeated by every worker process.
  (tmp_path / "imgs").mkdir()
  rows = ["filepath,caption"]
  for i in range(4):
    (tmp_path / "imgs" / f"{i}.png").write_bytes(_img("PNG", i * 40))
    rows.append(f"imgs/{i}.png,picture {i}")
  (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  import subprocess
  import sys

  out = tmp_path / "out"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "tcl_jax.data.convert",
      "csv",
      str(tmp_path / "pairs.csv"),
      "--output",
      str(out),
      "--num-shards",
      "2",
      "--workers",
      "2",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert r.returncode == 0, r.stderr
  assert r.stderr.strip().splitlines() == [f"2 shards in {out} (0 already done)"], r.stderr
  assert json.loads(r.stdout)["written"] == 4


def _pairs_csv(tmp_path, n=4, name="pairs.csv"):
  (tmp_path / "imgs").mkdir(exist_ok=True)
  rows = ["filepath,caption"]
  for i in range(n):
    (tmp_path / "imgs" / f"{i}.png").write_bytes(_img("PNG", i * 40))
    rows.append(f"imgs/{i}.png,picture {i}")
  (tmp_path / name).write_text("\n".join(rows) + "\n")
  return tmp_path / name


def _listing(path):
  return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_cli_output_holding_another_conversion_is_refused(tmp_path, capsys):
  # Was: the 2-shard run wrote beside the 3 old shards; train-*.tfrecord saw every pair twice.
  csv_path = _pairs_csv(tmp_path)
  out = tmp_path / "out"
  argv = ["csv", str(csv_path), "--output", str(out), "--workers", "1"]
  assert _run(capsys, [*argv, "--num-shards", "3"])["written"] == 4
  before = _listing(out)
  line = _one_error_line(_cli(*argv, "--num-shards", "2"))
  assert line == (
    f"error: --output={out} already holds 3 shards of another conversion (num_shards=3); "
    "readers would see both: give an empty directory, or delete what is there"
  )
  assert _listing(out) == before  # nothing written, nothing lost
  # The same conversion again still resumes (here: nothing left to do).
  assert _run(capsys, [*argv, "--num-shards", "3"])["written"] == 4
  assert _listing(out) == before
  # A folder of other files (no record of a conversion) is refused too.
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  line = _one_error_line(_cli(*argv[:2], "--output", str(other)))
  assert line == (
    f"error: --output={other} already holds 1 file, e.g. notes.txt, of a conversion it has no "
    "record of; readers would see both: give an empty directory, or delete what is there"
  )
  assert _listing(other) == {"notes.txt": b"mine"}


def test_cli_csv_with_a_header_only_is_a_usage_error(tmp_path):
  # Was: exit 0 and one empty shard.
  (tmp_path / "pairs.csv").write_text("filepath,caption\n")
  out = tmp_path / "out"
  line = _one_error_line(_cli("csv", str(tmp_path / "pairs.csv"), "--output", str(out)))
  assert line == f"error: {tmp_path / 'pairs.csv'} has a header but no rows: nothing to convert"
  assert not out.exists()


def test_cli_csv_not_in_utf8_names_the_file_and_line(tmp_path):
  # Was: a 20-line UnicodeDecodeError traceback.
  csv_path = _pairs_csv(tmp_path)
  lines = csv_path.read_bytes().splitlines(keepends=True)
  lines[2] = b"imgs/1.png,caf\xe9 au lait\n"  # Latin-1
  csv_path.write_bytes(b"".join(lines))
  out = tmp_path / "out"
  line = _one_error_line(_cli("csv", str(csv_path), "--output", str(out)))
  assert line == (
    f"error: {csv_path} line 3, column 15: byte 0xe9 is not UTF-8; save the file as UTF-8"
  )
  assert not out.exists()
