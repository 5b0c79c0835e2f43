"""What the parity tool (parity.py) and the trajectory replay (trajectory.py) share: reading a
reference fixture's model through our converter, and the error metrics both report.

A fixture directory is laid out like `shared/fixtures/tcl_tiny` (see its README): fixture.json,
fixture.npz and tcl_reference.pth, optionally trajectory.json/.npz. `tests/data/tcl_compact` is
the same layout at smaller dims, made by the same scripts (shared/reference/).
"""

import os

import numpy as np


def max_abs(a, b) -> float:
  """Largest elementwise |a - b| (inf when the shapes differ)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    return float("inf")
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def rel(a, b) -> float:
  """||a - b|| / ||b|| over all elements (||a - b|| when b is zero; inf when shapes differ)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    return float("inf")
  denom = np.linalg.norm(b.ravel())
  diff = np.linalg.norm((a - b).ravel())
  return float(diff / denom) if denom > 0 else float(diff)


def one_minus_cos(a, b) -> float:
  """1 - cosine of the flattened arrays (inf when shapes differ)."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    return float("inf")
  return float(1.0 - a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def load_fixture_model(fixture_dir: str, meta: dict):
  """(TCLConfig, params) of the fixture's `tcl_reference.pth`, through our converter.

  The fixture's heads are not width // 64, so they come from fixture.json (the original's
  build_model would need the same override); so do the loss weights and decoder settings.
  """
  from tcl_jax.weights import loading  # pylint: disable=g-import-not-at-top

  c = meta["clip"]
  cfg, params = loading.load_torch(
    os.path.join(fixture_dir, "tcl_reference.pth"),
    vision_heads=c.get("vision_heads", c["vision_width"] // 64),
    text_heads=c.get("transformer_heads", c["transformer_width"] // 64),
  )
  dec = meta.get("decoder", {})
  s2m = meta.get("sim2mask", {})
  cfg = cfg.replace(
    ie_ignore_last_attn=meta.get("ie_ignore_last_attn", True),
    decoder_act=dec.get("act", cfg.decoder_act),
    gumbel_tau=s2m.get("gumbel_tau", cfg.gumbel_tau),
    tcl_w=meta.get("tcl_w", cfg.tcl_w),
    area_w=meta.get("area_w", cfg.area_w),
    tv_w=meta.get("tv_w", cfg.tv_w),
  )
  return cfg, params
