"""CoDe's model pieces (tcl_jax.models.code) against independent renderings: the text tower run
from embeddings, the word masks, the word-segmentation cross-entropy (torch's semantics written
in numpy), the highlighting mask, the trainable set and its decay, and the recipe's values
(the authors' configs/default.yml + experiment_configs.yml). The end-to-end check against the
authors' code is tests/test_code_parity.py."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcl_jax import kinds
from tcl_jax import tokenizer
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import code as code_lib
from tcl_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = [
  "a dog on a beach",
  "red apples on a table",
  "a man riding a bicycle",
  "a city at night",
]
NOUNS = [["dog", "beach"], ["apples", "table"], ["man", "bicycle"], ["city", "night"]]


@pytest.fixture(scope="module")
def tiny():
  cfg = code_lib.tiny_config()
  return cfg, code_lib.init_params(cfg, jax.random.key(0))


def _config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b, n = len(CAPTIONS), 2
  flat = [x for ns in NOUNS for x in ns]
  labels = np.full((b, 77), -1, np.int32)
  labels[:, 2] = 1  # "dog", "apples", ...: a noun, a background word and padding
  labels[:, 4] = 0
  labels[:, 5] = 2
  return dict(
    image=jnp.asarray(rng.normal(size=(b, 96, 96, 3)), jnp.float32),
    text_tokens=jnp.asarray(tokenizer.tokenize(CAPTIONS)),
    noun_tokens=jnp.asarray(code_lib.noun_tokens(flat, cfg).reshape(b, n, -1)),
    kg_tokens=jnp.asarray(
      tokenizer.tokenize([f"a photo of a {x}." for x in flat]).reshape(b, n, -1)
    ),
    word_labels=jnp.asarray(labels),
  )


def test_text_tower_from_embeddings_is_clips_text_tower(tiny):
  cfg, p = tiny
  toks = jnp.asarray(tokenizer.tokenize(CAPTIONS))
  ref = clip_lib.encode_text(p["clip"], cfg.clip, toks)
  emb = code_lib.token_embed(p["clip"]["text"], toks)
  got = code_lib.encode_embedded(p["clip"]["text"], cfg, emb, jnp.argmax(toks, -1))
  np.testing.assert_allclose(got, ref, atol=1e-6)


def test_prompt_starts_as_a_photo_of_x(tiny):
  # PromptLearner: ctx = token embeddings of "A photo of x x ..." after SOT.
  cfg, p = tiny
  ids = tokenizer.tokenize(["A photo of" + " x" * 50])[0, 1:17]
  emb = np.asarray(p["clip"]["text"]["token_embedding"]["embedding"])
  np.testing.assert_array_equal(np.asarray(p["prompt_ctx"]), emb[ids])
  assert [tokenizer.get_tokenizer().decode([int(i)]).strip() for i in ids[:4]] == [
    "a",
    "photo",
    "of",
    "x",
  ]


def test_noun_tokens_are_the_prompters():
  # tokenize(noun, context_length=77 - 16, truncate=True)[:, 1:]: 60 ids, SOT dropped, EOT kept.
  cfg = code_lib.tiny_config()
  t = code_lib.noun_tokens(["dog", "traffic light"], cfg)
  assert t.shape == (2, 60) and cfg.noun_length == 60
  full = tokenizer.tokenize(["dog", "traffic light"])
  np.testing.assert_array_equal(t[:, :5], full[:, 1:6])
  assert t[0, 1] == tokenizer.EOT_ID and t[1, 2] == tokenizer.EOT_ID


def test_prompted_embedding_pools_at_eot_after_the_context(tiny):
  cfg, p = tiny
  toks = jnp.asarray(code_lib.noun_tokens(["dog"], cfg))
  got = code_lib.prompted_noun_emb(p, cfg, toks)
  tp = p["clip"]["text"]
  sot = tp["token_embedding"]["embedding"][tokenizer.SOT_ID][None, None]
  x = jnp.concatenate([sot, p["prompt_ctx"][None], code_lib.token_embed(tp, toks)], axis=1)
  want = code_lib.encode_embedded(tp, cfg, x, jnp.asarray([16 + 1 + 1]))
  want = want / np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def _torch_weighted_ce(logits, labels, weight):
  """torch F.cross_entropy(logits [b, K, L], labels [b, L], weight, ignore_index=-1), in numpy."""
  logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  num = den = 0.0
  for i in range(labels.shape[0]):
    for j in range(labels.shape[1]):
      y = labels[i, j]
      if y == -1:
        continue
      num += -logp[i, y, j] * weight[y]
      den += weight[y]
  return num / den


def test_word_segmentation_ce_is_torchs_weighted_mean():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 3, 11)) * 3
  labels = rng.integers(-1, 3, size=(3, 11))
  want = _torch_weighted_ce(logits, labels, [0.5, 1.0, 1.0])
  got = code_lib.word_seg_loss(jnp.asarray(logits), jnp.asarray(labels), 0.5)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # Without the background weight it is another number (the weight matters).
  assert (
    abs(float(code_lib.word_seg_loss(jnp.asarray(logits), jnp.asarray(labels), 1.0)) - want) > 1e-3
  )


def test_word_masks_softmax_against_a_zero_background(tiny):
  cfg, p = tiny
  rng = np.random.default_rng(2)
  b, n, l, c = 2, 2, 5, 4
  dense = rng.normal(size=(b, l, c))
  nouns = rng.normal(size=(b * n, c))
  logits, probs = code_lib.word_masks(
    {"text_mask_w": 10.0, "text_mask_b": -1.0}, jnp.asarray(dense), jnp.asarray(nouns), n
  )
  for i in range(b):
    for k in range(n):
      s = dense[i] @ nouns[i * n + k] * 10.0 - 1.0  # row i * n + k: example-major
      np.testing.assert_allclose(logits[i, 1 + k], s, rtol=1e-5)
  z = np.concatenate([np.zeros((b, 1, l)), np.asarray(logits)[:, 1:]], axis=1)
  soft = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(probs).reshape(b, n, l), soft[:, 1:], rtol=1e-5)


def test_highlight_mask_opens_sot_eot_and_padding():
  probs = jnp.full((2, 8), 0.25)
  tokens = jnp.asarray([[49406, 10, 11, 49407, 0, 0, 0, 0]])
  m = np.asarray(code_lib.highlight_mask(probs, tokens, 2))
  np.testing.assert_array_equal(m[0], [1, 0.25, 0.25, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(m[1], m[0])


def test_code_loss_has_the_nine_terms_and_trains_every_learnable(tiny):
  cfg, p = tiny
  batch = _batch(cfg)
  # Open the decoder's zero-init gates so every tensor gets a gradient (as the fixture does).
  p = jax.tree_util.tree_map_with_path(
    lambda path, x: x + 0.5 if "gate" in jax.tree_util.keystr(path) else x, p
  )
  (loss, aux), g = jax.jit(
    jax.value_and_grad(
      lambda q: code_lib.code_loss(q, cfg, batch, rng=jax.random.key(1)), has_aux=True
    )
  )(p)
  assert set(code_lib.LOSS_TERMS) <= set(aux) and len(code_lib.LOSS_TERMS) == 9
  np.testing.assert_allclose(
    float(loss), sum(float(aux[k]) for k in code_lib.LOSS_TERMS), rtol=1e-6
  )
  assert aux["soft_pos_mask"].shape == (4, 24, 24)
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(g["clip"]))
  trainable = {k: v for k, v in g.items() if k != "clip"}
  flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
  assert len(flat) == 59  # the authors' trainable tensors (set_train(decoder_only=False))
  dead = [jax.tree_util.keystr(k) for k, v in flat if float(jnp.abs(v).sum()) == 0]
  assert dead == [], dead


def test_each_weight_scales_its_term(tiny):
  cfg, p = tiny
  batch = _batch(cfg)
  f = jax.jit(lambda c: code_lib.code_loss(p, c, batch, rng=jax.random.key(1))[1], static_argnums=0)
  base = f(cfg)
  pairs = dict(
    kg_w="kg_loss", tcl_w="hlf_noun_loss", tv_w="tv_img_loss", pos_area_w="area_loss",
    neg_area_w="neg_area_loss", tseg_w="tseg_loss", hcl_w="hcl_loss",
  )  # fmt: skip
  for field, term in pairs.items():
    got = f(cfg.replace(**{field: getattr(cfg, field) * 3}))
    np.testing.assert_allclose(float(got[term]), 3 * float(base[term]), rtol=1e-5, err_msg=field)
  # tcl_w also weighs TCL_i, tv_w the masks' TV.
  got = f(cfg.replace(tcl_w=0.3, tv_w=3.0))
  np.testing.assert_allclose(
    float(got["hli_noun_loss"]), 3 * float(base["hli_noun_loss"]), rtol=1e-5
  )
  np.testing.assert_allclose(float(got["tv_mask_loss"]), 3 * float(base["tv_mask_loss"]), rtol=1e-5)


def test_recipe_is_the_authors(tiny):
  # configs/default.yml + experiment_configs.yml of the authors' code (d38feeb), read by hand.
  c = _config("code")
  m = c.model
  assert (m.kg_w, m.tcl_w, m.tv_w, m.hcl_w, m.tseg_w) == (8.0, 0.1, 1.0, 0.5, 1.0)
  assert (m.pos_area, m.pos_area_w, m.neg_area_w, m.tseg_bg_weight) == (0.25, 0.5, 0.05, 0.5)
  assert (m.decoder_double, m.n_ctx, m.text_decoder_layers, m.text_decoder_heads) == (
    False,
    16,
    2,
    8,
  )
  assert (m.sim2mask_init_w, m.sim2mask_init_b, m.ie_freeze) == (10.0, -2.5, 11)
  assert (c.total_steps, c.batch_size, c.optim.warmup_steps, c.optim.ust_steps) == (
    50000,
    64,
    15000,
    30000,
  )
  assert c.input.num_nouns == 2 and tuple(c.input.augment.scale) == (0.9, 1.0)
  assert (c.evals.pamr, c.evals.bg_thresh, c.evals.kp_w, c.eval_every_steps) == (
    True,
    0.4,
    0.3,
    5000,
  )
  assert c.evals.tasks.split(",") == [
    "voc",
    "context",
    "coco_stuff",
    "coco_object",
    "cityscapes",
    "ade20k",
  ]
  # The figure: 3.2e-4 * (16 x 4 GPUs) / 4096 = 5e-6 at the peak.
  lr, min_lr = optim.scaled_lrs(c.optim, c.batch_size)
  np.testing.assert_allclose((lr, min_lr), (5e-6, 6.25e-7), rtol=1e-12)
  assert kinds.build_model(c).batch_keys[2:] == ("noun_tokens", "kg_tokens", "word_labels")


def test_text_mask_gate_is_decayed_and_clip_frozen(tiny):
  # The authors' rule decays everything not 1-D and not named *.bias: text_mask_b (0-d) is decayed.
  _, p = tiny
  mask = optim.decay_mask(p)
  assert mask["text_mask_b"] and mask["text_mask_w"] and mask["bg_text"] and mask["prompt_ctx"]
  assert not mask["text_decoder"]["resblocks_0"]["c_fc"]["bias"]
  labels = optim.param_labels(p, r"^clip/", r"^masker/backbone/")
  flat = dict(
    (jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(labels)[0]
  )
  assert all(v == "frozen" for k, v in flat.items() if k.startswith("['clip']"))
  assert flat["['prompt_ctx']"] == "trainable" and flat["['bg_image']"] == "trainable"
  assert sum(v == "ust" for v in flat.values()) == 12  # one CLIP block copied into the masker


def test_zero_shot_uses_the_prompt_for_the_masker_and_templates_for_kp(tiny):
  cfg, p = tiny
  zs = kinds.zero_shot_model(cfg)
  names = ["dog", "traffic light", "sky"]
  text = zs.class_text(p, names, ("a photo of a {}.", "a {}."))
  assert text.shape == (3, 2 * cfg.clip.embed_dim)
  np.testing.assert_allclose(
    text[:, :64],
    code_lib.prompted_noun_emb(p, cfg, jnp.asarray(code_lib.noun_tokens(names, cfg))),
    atol=1e-6,
  )
  win = jnp.asarray(np.random.default_rng(0).normal(size=(1, 96, 96, 3)), jnp.float32)
  a = zs.window_masks(p, text, win, pamr=False, kp_w=0.3, simmaps=False)
  other_kp = text.at[:, 64:].set(text[::-1, 64:])
  b = zs.window_masks(p, other_kp, win, pamr=False, kp_w=0.3, simmaps=False)
  c = zs.window_masks(p, other_kp, win, pamr=False, kp_w=0.0, simmaps=False)
  d = zs.window_masks(p, text, win, pamr=False, kp_w=0.0, simmaps=False)
  assert float(jnp.abs(a - b).max()) > 1e-3  # the KP half feeds the KP branch
  np.testing.assert_array_equal(c, d)  # and nothing else
  assert kinds.kind_of(cfg) == "code" and kinds.kind_of(cfg.replace()) == "code"
