"""bfloat16 compute (float32 params), the GPU/TPU training default, against the original's float32
values on the shared fixture: `python -m tcl_jax.tools.parity FIXTURE --dtype bfloat16`.

The issue's bounds are asserted here directly (loss terms relative <= 2e-2, per-tensor gradient
cosine >= 0.99, >= 99% of mask pixels labelled alike, the 12-step trajectory's losses within 5e-2);
the tool's own tolerances (tcl_jax/tools/parity.py BF16_TOL) are tighter and must hold too.
"""

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tcl_tiny"
pytestmark = pytest.mark.skipif(
  not FIXTURE.is_dir(), reason="../shared fixtures not present (clone without the shared fixtures)"
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bf16") / "r.json"
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user runs it (not conftest's 8)
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "tcl_jax.tools.parity",
      str(FIXTURE),
      "--dtype",
      "bfloat16",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=900,
    env=env,
  )
  assert out.exists(), r.stderr[-3000:]
  return r, {x["name"]: x for x in json.loads(out.read_text())["results"]}


def test_bf16_fixture_quantities_within_the_bounds(report):
  r, res = report
  fixture = {n: x for n, x in res.items() if not n.startswith("trajectory/")}
  bad = [x for x in fixture.values() if not x["ok"]]
  assert not bad, bad
  arrays = set(np.load(FIXTURE / "fixture.npz").files)
  assert set(fixture) == arrays - {"images", "text_tokens", "gumbel_uniform", "seg_image"}
  ref = np.load(FIXTURE / "fixture.npz")
  for name, x in fixture.items():
    assert x["error"] <= x["tolerance"], x
    if name.startswith("loss/") or name == "total_loss":
      assert x["metric"] == "rel" and x["error"] <= 2e-2, x
    elif name.startswith("grad/") and ref[name].size > 1:
      assert x["metric"] == "1-cos" and x["error"] <= 1e-2, x  # cosine >= 0.99
    elif name.startswith("grad/"):  # scalars: a cosine is only their sign; logit scales 2.5e-2
      assert x["metric"] == "rel" and x["error"] <= 6e-2, x
    elif name.startswith("masks_"):
      assert x["metric"] == "label_diff" and x["error"] <= 1e-2, x
  assert sum(n.startswith("grad/") for n in fixture) == 39


def test_bf16_trajectory_losses_stay_within_5e_2_over_all_steps(report):
  r, res = report
  losses = [n for n in res if n == "trajectory/total_loss" or n.startswith("trajectory/loss/")]
  assert len(losses) == 7
  for n in losses:
    # error is the worst step's relative error; first_bad_step names a step out of tolerance.
    assert res[n]["error"] <= 5e-2 and res[n]["first_bad_step"] is None, res[n]
  bad = [x for n, x in res.items() if n.startswith("trajectory/") and not x["ok"]]
  assert not bad, bad
  assert r.returncode == 0, r.stdout[-3000:]
