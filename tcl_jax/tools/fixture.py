"""What the parity tool (parity.py) and the trajectory replay (trajectory.py) share: reading a
reference fixture's model through our converter, and the error metrics both report.

A fixture directory is laid out like `shared/fixtures/tcl_tiny` (see its README): fixture.json,
fixture.npz and tcl_reference.pth, optionally trajectory.json/.npz. `tests/data/tcl_compact` is
the same layout at smaller dims, made by the same scripts (shared/reference/).

A CoDe fixture (`tests/fixtures/code_tiny`, made by tools/reference/code_fixture.py from the
authors' code) has fixture.json, fixture.npz, trajectory.json/.npz and, in its full copy,
code_reference.pth; its compact copy rebuilds the weights from a recipe instead.
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


def is_code_fixture(meta: dict) -> bool:
  """A fixture of the CoDe authors' model (tools/reference/code_fixture.py), full or compact."""
  return meta.get("model_config", {}).get("type") == "ImageTextCoDecomposition"


def load_code_fixture_model(fixture_dir: str, meta: dict):
  """(CoDeConfig, params) of a CoDe fixture's weights, through our converter: the full copy's
  `code_reference.pth`, or the compact copy's recipe regenerated into the same state_dict
  (tools/reference/seeded_state.py). Heads and loss weights come from fixture.json."""
  from tcl_jax.tools.reference import seeded_state  # pylint: disable=g-import-not-at-top
  from tcl_jax.weights import loading  # pylint: disable=g-import-not-at-top

  d, m = meta["dims"], meta["model_config"]
  heads = dict(vision_heads=d["vision_heads"], text_heads=d["transformer_heads"])
  path = os.path.join(fixture_dir, "code_reference.pth")
  if os.path.isfile(path):
    cfg, params = loading.load_torch(path, text_decoder_heads=d["text_decoder_heads"], **heads)
  else:
    arrays = seeded_state.state_dict_arrays(meta["recipe"])
    # The compact copy keeps a sample of each tensor as the authors' model held it.
    with np.load(os.path.join(fixture_dir, "fixture.npz")) as ref:
      for key, x in arrays.items():
        idx = ref.get(f"state/{key}@idx")
        if idx is not None and not np.array_equal(x.ravel()[idx], ref[f"state/{key}@val"]):
          raise ValueError(f"{key}: the recipe does not regenerate the fixture's weights")
    sd = seeded_state.code_state_dict(arrays)
    cfg, params = loading.convert_state_dict(
      sd, text_decoder_heads=d["text_decoder_heads"], **heads
    )
  masker = m.get("masker", {})
  cfg = cfg.replace(
    ie_ignore_last_attn=m.get("ie_ignore_last_attn", cfg.ie_ignore_last_attn),
    decoder_act=masker.get("decoder", {}).get("act", cfg.decoder_act),
    gumbel_tau=masker.get("sim2mask", {}).get("gumbel_tau", cfg.gumbel_tau),
    kg_w=m["w_kg"],
    tcl_w=m["w_tcl"],
    tv_w=m["w_tv"],
    pos_area=m["pos_area"],
    pos_area_w=m["w_pos_area"],
    neg_area_w=m["w_neg_area"],
    hcl_w=m["w_hcl"],
    tseg_w=m["w_tseg"],
    region_highlighting=m["use_region_highlighting_prompt"],
    word_highlighting=m["use_word_highlighting_prompt"],
  )
  return cfg, params
