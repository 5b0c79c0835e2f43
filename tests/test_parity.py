"""The parity tool on the shared reference fixture: every array the original produced on random
weights must be reproduced within the fixture README's tolerances."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tcl_tiny"
pytestmark = pytest.mark.skipif(
    not FIXTURE.is_dir(), reason="../shared fixtures not present (clone without the shared fixtures)")


def test_parity_tool_reports_every_fixture_quantity_ok(tmp_path):
  out = tmp_path / "r.json"
  r = subprocess.run([sys.executable, "-m", "tcl_jax.tools.parity", str(FIXTURE), "--json", str(out)],
                     capture_output=True, text=True, timeout=900)
  report = json.loads(out.read_text())
  bad = [x for x in report["results"] if not x["ok"]]
  assert not bad, bad
  assert r.returncode == 0 and report["ok"] is True
  names = {x["name"] for x in report["results"]}
  arrays = set(np.load(FIXTURE / "fixture.npz").files)
  inputs = {"images", "text_tokens", "gumbel_uniform", "seg_image"}
  assert names == arrays - inputs  # nothing left uncompared
  assert sum(n.startswith("grad/") for n in names) == 39
  for x in report["results"]:
    assert x["metric"] in ("max_abs", "rel", "exact")
    assert x["error"] <= x["tolerance"]


def test_parity_tool_rejects_a_non_fixture_directory(tmp_path):
  r = subprocess.run([sys.executable, "-m", "tcl_jax.tools.parity", str(tmp_path)],
                     capture_output=True, text=True)
  assert r.returncode == 2 and "no fixture.json" in r.stderr
