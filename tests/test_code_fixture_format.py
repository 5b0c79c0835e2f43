"""The compact CoDe reference fixture (tests/fixtures/code_tiny, made from the authors' PyTorch code
by tools/reference/code_fixture.py) and the numpy-only rules that rebuild what it leaves
out (tcl_jax/tools/reference/seeded_state.py): the recipe regenerates exactly the weights the
authors' model held, the seeded inputs regenerate, the format is complete, and the rules are
pinned (a changed rule would silently change every fixture value)."""

import functools
import json
import os

import numpy as np

from tcl_jax.tools.reference import seeded_state

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "code_tiny")
EOT = 49407


@functools.lru_cache
def _meta(name):
  with open(os.path.join(HERE, name + ".json")) as f:
    return json.load(f)


@functools.lru_cache
def _npz(name):
  return dict(np.load(os.path.join(HERE, name + ".npz")))


@functools.lru_cache(maxsize=1)
def _weights():
  return seeded_state.state_dict_arrays(_meta("fixture")["recipe"])


def test_recipe_is_the_current_rule():
  meta = _meta("fixture")
  recipe = json.loads(json.dumps(seeded_state.code_recipe(meta["dims"], meta["seed"])))
  assert recipe == meta["recipe"]


def test_recipe_regenerates_what_the_authors_model_held():
  meta, arrays, ref = _meta("fixture"), _weights(), _npz("fixture")
  entries = meta["recipe"]["entries"]
  assert sorted(arrays) == sorted(entries)
  for key, ent in entries.items():
    x = arrays[key]
    assert x.dtype == np.float32 and list(x.shape) == ent["shape"], key
    idx, val = ref[f"state/{key}@idx"], ref[f"state/{key}@val"]
    np.testing.assert_array_equal(x.ravel()[idx], val, err_msg=key)


def test_expansion_names_every_state_dict_key():
  meta, arrays = _meta("fixture"), _weights()
  sd = seeded_state.code_state_dict(arrays)
  keys = set(meta["state_dict_keys"])
  assert set(sd) == {k for k in keys if not k.startswith("pamr.")}
  assert set(meta["trainable"]) <= set(meta["recipe"]["entries"])
  emb = arrays["frozen_clip.token_embedding.weight"]
  np.testing.assert_array_equal(
    sd["clip_text_encoder.prompt_learner.token_prefix"][0, 0], emb[49406]
  )
  proj = arrays["frozen_clip.visual.proj"]
  assert sd["clip_image_encoder.clip_proj.proj"] is proj
  assert not np.array_equal(sd["masker.image_encoder.decoder.image_proj.proj"], proj)  # moved


def test_seeded_inputs_regenerate():
  for name in ("fixture", "trajectory"):
    meta, ref = _meta(name), _npz(name)
    generated = meta["compact"]["generated"]
    assert generated
    for key, spec in generated.items():
      x = seeded_state.generated_array(spec)
      assert list(x.shape) == meta["arrays"][key][0], key
      np.testing.assert_array_equal(x.ravel()[ref[key + "@idx"]], ref[key + "@val"], err_msg=key)
      if spec["rule"] == "uniform":
        assert spec["margin"] >= 1e-4 and 0 < x.min() and x.max() < 1


def test_compact_copy_is_complete_and_small():
  for name in ("fixture", "trajectory"):
    meta, ref = _meta(name), _npz(name)
    c = meta["compact"]
    for key, (shape, dtype) in meta["arrays"].items():
      if key in c["generated"] or key.startswith("init/"):
        continue
      if key in ref:
        assert list(ref[key].shape) == shape and str(ref[key].dtype) == dtype, key
        continue
      skey = "delta/" + key[len("final/") :] if key.startswith("final/") else key
      assert c["summarized"][skey] == shape, key
      assert ref[skey + "@proj"].shape == (seeded_state.N_PROJ,), key
      assert ref[skey + "@val"].shape == (seeded_state.N_SAMPLE,), key
      assert float(ref[skey + "@norm"]) > 0, key
  size = sum(os.path.getsize(os.path.join(HERE, f)) for f in os.listdir(HERE))
  assert size < 3e6


def test_batch_covers_the_label_cases():
  meta, ref = _meta("fixture"), _npz("fixture")
  B, N = meta["batch"], meta["num_nouns"]
  labels, tokens = ref["word_labels"], ref["text_tokens"]
  assert labels.shape == (B, 77) and ref["noun_tokens"].shape == (B, N, 60)
  assert (labels[0] == 0).sum() == 1  # "photo": a record noun that was not drawn
  assert (np.diff((labels[1] == 1).astype(int)) == 1).sum() == 2  # "table" twice
  assert (labels[2] == 1).sum() == 2  # "skateboarder": two BPE tokens
  assert tokens[3, 76] == EOT and 2 not in labels[3]  # "skyline" cut off by truncation
  assert (ref["noun_tokens"] == EOT).sum(-1).tolist() == [[1] * N] * B  # no SOT, one EOT
  assert (ref["kg_tokens"][..., 0] == EOT - 1).all()  # SOT first
  total = sum(float(ref[f"loss/{k}"]) for k in meta["losses"])
  np.testing.assert_allclose(total, float(ref["total_loss"]), rtol=1e-6)
  assert len(meta["trainable"]) == 59 and len(meta["losses"]) == 9


def test_seeded_state_is_pinned():
  w = _weights()
  got = [
    w["frozen_clip.token_embedding.weight"][0, 0],
    w["frozen_clip.visual.conv1.weight"][0, 0, 0, 0],
    w["masker.image_encoder.backbone.transformer.resblocks.3.ln_1.weight"][0],
    w["masker.sim2mask.w"],
    w["text_mask_b"],
    w["learnable_image_bg"][0, 0, 0, 0],
    w["tcli_loss.logit_scale"],
  ]
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(PINNED_WEIGHTS, np.float32))
  img = seeded_state.generated_array({"rule": "image", "seed": [0, 1, 0], "shape": [1, 3, 1, 2]})
  np.testing.assert_array_equal(img.ravel(), np.asarray(PINNED_IMAGE, np.float32))
  np.testing.assert_array_equal(seeded_state.summary_indices("x", 1000, 0, 4), PINNED_INDICES)
  x = np.arange(10.0)
  a, b = seeded_state.summarize("x", x, 3), seeded_state.summarize("x", x, 3)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  np.testing.assert_allclose(a["proj"][0], PINNED_PROJ, rtol=1e-12)


# regenerated values at seed 0 (numpy 2.4 and 2.5 agree); a change here changes every fixture value
PINNED_WEIGHTS = [
  -0.03474127873778343,  # frozen_clip.token_embedding.weight[0, 0]
  0.016785671934485435,  # frozen_clip.visual.conv1.weight[0, 0, 0, 0]
  0.9972699880599976,  # the masker's copy of block 3's ln_1.weight[0] (like: CLIP + 0.01 z)
  9.856724739074707,  # masker.sim2mask.w
  0.41471558809280396,  # text_mask_b
  0.11871200054883957,  # learnable_image_bg[0, 0, 0, 0]
  2.9592599868774414,  # tcli_loss.logit_scale (const log(1/0.07) + 0.3)
]
PINNED_IMAGE = [
  1.7674182653427124,
  0.3150133192539215,
  1.5397682189941406,
  2.2344367504119873,
  -1.5439326763153076,
  -0.7537747025489807,
]
PINNED_INDICES = [480, 801, 660, 845]
PINNED_PROJ = -5.612383567161775
