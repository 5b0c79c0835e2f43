"""The parity tool on the reference fixtures: every array the original produced on random weights
must be reproduced within the fixture README's tolerances.

Two fixtures of the same layout: `tests/data/tcl_compact` (committed, small dims: runs in every
clone) and `../shared/fixtures/tcl_tiny` (the CI reference; skipped with a message when absent).
"""

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

COMPACT = Path(__file__).resolve().parent / "data" / "tcl_compact"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tcl_tiny"
FIXTURES = [
  pytest.param(COMPACT, id="compact"),
  pytest.param(
    SHARED,
    id="shared",
    marks=pytest.mark.skipif(
      not SHARED.is_dir(),
      reason="../shared fixtures not present (clone without the shared fixtures)",
    ),
  ),
]


@pytest.mark.parametrize("fixture_dir", FIXTURES)
def test_parity_tool_reports_every_fixture_quantity_ok(tmp_path, fixture_dir):
  out = tmp_path / "r.json"
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.tools.parity", str(fixture_dir), "--json", str(out)],
    capture_output=True,
    text=True,
    timeout=900,
  )
  report = json.loads(out.read_text())
  bad = [x for x in report["results"] if not x["ok"]]
  assert not bad, bad
  assert r.returncode == 0 and report["ok"] is True
  names = {x["name"] for x in report["results"] if not x["name"].startswith("trajectory/")}
  arrays = set(np.load(fixture_dir / "fixture.npz").files)
  inputs = {"images", "text_tokens", "gumbel_uniform", "seg_image"}
  assert names == arrays - inputs  # nothing left uncompared
  assert sum(n.startswith("grad/") for n in names) == 39
  for x in report["results"]:
    assert x["metric"] in ("max_abs", "rel", "exact", "delta_rel")
    assert x["error"] <= x["tolerance"]

  # The 12-step training trajectory, replayed through make_optimizer and the jitted train step.
  traj = {x["name"]: x for x in report["results"] if x["name"].startswith("trajectory/")}
  ref = np.load(fixture_dir / "trajectory.npz")
  series = {"trajectory/lr", "trajectory/total_loss", "trajectory/grad_norm"} | {
    "trajectory/" + k for k in ref.files if k.startswith("loss/")
  }
  trained = json.loads((fixture_dir / "trajectory.json").read_text())["trained_params"]
  assert set(traj) == series | {"trajectory/final/" + n for n in trained}
  assert len(trained) == 39 and len(series) == 9
  assert traj["trajectory/lr"]["tolerance"] == 1e-6
  assert traj["trajectory/grad_norm"]["tolerance"] == 1e-4
  assert all(x["tolerance"] == 5e-3 for n, x in traj.items() if "/final/" in n)
  assert all(traj[n]["first_bad_step"] is None for n in series)


def test_parity_tool_rejects_a_non_fixture_directory(tmp_path):
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.tools.parity", str(tmp_path)], capture_output=True, text=True
  )
  assert r.returncode == 2 and "no fixture.json" in r.stderr


def test_trajectory_report_names_the_first_step_out_of_tolerance():
  from tcl_jax.tools import trajectory

  ref = np.array([1.0, 2.0, 3.0, 4.0])
  ours = np.array([1.0, 2.0 * (1 + 1e-3), 3.0, 4.0 * (1 + 5e-3)])
  r = trajectory.series_result("trajectory/x", ours, ref, 1e-4)
  assert not r["ok"] and r["first_bad_step"] == 1 and r["worst_step"] == 3
  assert abs(r["error"] - 5e-3) < 1e-9
  r = trajectory.series_result("trajectory/x", ref * (1 + 1e-6), ref, 1e-4)
  assert r["ok"] and r["first_bad_step"] is None
