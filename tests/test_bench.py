"""The benchmark entry point runs and reports what it measured (no timing assertions here)."""

import jax.numpy as jnp
import numpy as np

from tcl_jax import bench


def test_bench_tiny_preset_reports_a_finite_step():
  r = bench.run("tiny", steps=1, dtype=jnp.float32, remat=False)
  assert (r["batch"], r["resolution"]) == (4, 96)
  assert np.isfinite(r["loss"]) and r["loss"] > 0
  assert r["median_step_s"] > 0 and r["compile_s"] > 0
  assert r["torch_cpu_reference_s"] == 0.057


def test_bench_train_step_runs_through_the_loop():
  r = bench.run_train("tiny", steps=2, batch=8)
  assert r["devices"] == 8 and r["global_batch"] == 8  # tests/conftest.py: 8 fake devices
  assert r["time_to_first_step_s"] > 0 and r["steps_per_sec_after_first"] > 0
