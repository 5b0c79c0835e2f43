"""CLIP towers and TCL building blocks: resize kernels against torch's outputs, attention variants,
shapes and error messages. Parity with the original on whole forward/backward passes is in
test_parity.py."""

import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import conv
from tcl_jax.models import losses
from tcl_jax.models import resize
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.models import tcl_inference

# Outputs of torch 2.13 F.interpolate on fixed random inputs (generated once, stored as data).
TORCH = np.load(os.path.join(os.path.dirname(__file__), "data", "torch_interpolate.npz"))


@pytest.mark.parametrize("hw", [(2, 5), (4, 4), (7, 3), (3, 3), (1, 1)])
def test_pos_emb_interpolation_matches_torch_bicubic(hw):
  got = clip_lib.interpolate_pos_emb(jnp.asarray(TORCH["pe"]), *hw)
  np.testing.assert_allclose(np.asarray(got), TORCH[f"pe_{hw[0]}x{hw[1]}"], atol=2e-6)


def test_jax_image_resize_is_not_torch_bicubic():
  # Why resize.py exists: jax.image.resize's cubic kernel differs from torch's (A=-0.75).
  g = jnp.asarray(TORCH["pe"][1:].reshape(3, 3, 5))
  theirs = jax.image.resize(g, (7, 3, 5), "bicubic").reshape(21, 5)
  assert np.max(np.abs(np.asarray(theirs) - TORCH["pe_7x3"][1:])) > 1e-3


@pytest.mark.parametrize("hw", [(9, 13), (3, 4), (5, 7), (11, 2)])
@pytest.mark.parametrize(
  "mode,align,key",
  [
    ("bilinear", False, "bilinear"),
    ("bilinear", True, "bilinear_ac"),
    ("nearest", False, "nearest"),
  ],
)
def test_resize_matches_torch(hw, mode, align, key):
  got = resize.resize_hw(jnp.asarray(TORCH["x"]), hw, mode, align, layout="NCHW")
  np.testing.assert_allclose(np.asarray(got), TORCH[f"{key}_{hw[0]}x{hw[1]}"], atol=5e-6)
  nhwc = resize.resize_hw(jnp.asarray(TORCH["x"].transpose(0, 2, 3, 1)), hw, mode, align)
  np.testing.assert_allclose(
    np.asarray(nhwc).transpose(0, 3, 1, 2), TORCH[f"{key}_{hw[0]}x{hw[1]}"], atol=5e-6
  )


def test_identity_attention_equals_diagonal_masked_attention():
  blk = clip_lib.MultiheadAttention(width=32, heads=4)
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  p = blk.init(jax.random.key(1), x)
  fast = blk.apply(p, x, self_only=True)
  # The original's way: additive -inf mask off the diagonal.
  qkv = x @ p["params"]["in_proj"]["kernel"] + p["params"]["in_proj"]["bias"]
  q, k, v = [t.reshape(2, 7, 4, 8) for t in jnp.split(qkv, 3, -1)]
  y = jax.nn.dot_product_attention(q, k, v, mask=jnp.eye(7, dtype=bool)[None, None])
  slow = y.reshape(2, 7, 32) @ p["params"]["out_proj"]["kernel"] + p["params"]["out_proj"]["bias"]
  np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), atol=1e-5)
  assert np.max(np.abs(np.asarray(fast) - np.asarray(blk.apply(p, x)))) > 1e-3


def test_text_tower_pools_at_eot_and_ignores_padding():
  cfg = tcl_lib.tiny_config().clip
  params = clip_lib.init_clip_params(cfg, jax.random.key(0))
  a = np.zeros((1, 77), np.int32)
  a[0, :4] = [49406, 320, 1929, 49407]
  b = a.copy()
  b[0, 10] = 500  # after EOT: causal attention means it cannot change the EOT token's output
  ea, eb = (np.asarray(clip_lib.encode_text(params, cfg, t)) for t in (a, b))
  np.testing.assert_allclose(ea, eb, atol=1e-6)
  c = a.copy()
  c[0, 1] = 321  # before EOT: changes it
  assert np.max(np.abs(np.asarray(clip_lib.encode_text(params, cfg, c)) - ea)) > 1e-4


def test_image_smaller_than_patch_is_a_clear_error():
  cfg = tcl_lib.tiny_config()
  params = tcl_lib.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
    clip_lib.encode_image(params["clip"], cfg.clip, jnp.zeros((1, 15, 40, 3)))
  with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
    tcl_inference.generate_masks(params, cfg, jnp.zeros((1, 40, 8, 3)), jnp.ones((2, 64)))


def test_bad_config_values_are_rejected():
  cfg = tcl_lib.tiny_config()
  with pytest.raises(ValueError, match="ie_freeze must be in"):
    cfg.replace(ie_freeze=5)
  with pytest.raises(ValueError, match="decoder_norm"):
    cfg.replace(decoder_norm="bn")
  with pytest.raises(ValueError, match="unknown TCL config fields"):
    tcl_lib.TCLConfig.from_dict(dict(cfg.to_dict(), bogus=1))
  assert tcl_lib.TCLConfig.from_dict(cfg.to_dict()) == cfg


def test_masker_starts_as_clip_copy_with_closed_gates():
  cfg = tcl_lib.tiny_config()
  params = tcl_lib.init_params(cfg, jax.random.key(0))
  m, v = params["masker"], params["clip"]["visual"]
  assert set(m["backbone"]) == {"resblocks_3"}
  np.testing.assert_array_equal(
    m["backbone"]["resblocks_3"]["c_fc"]["kernel"], v["resblocks_3"]["c_fc"]["kernel"]
  )
  np.testing.assert_array_equal(m["image_proj"]["proj"], v["proj"])
  gates = [m["decoder"][f"net_{i}"][c]["gate"] for i in range(2) for c in ("conv", "conv2")]
  assert all(float(g) == 0.0 for g in gates)
  assert float(m["sim2mask"]["w"]) == 10.0 and float(m["sim2mask"]["b"]) == -2.5
  # With closed gates the decoder is a pure x4 nearest upsampling of the backbone output.
  g = cfg.clip.grid_size
  img = jax.random.normal(jax.random.key(1), (2, 96, 96, 3))
  feat, hw = tcl_lib.clip_features(params["clip"], cfg, img)
  emb = tcl_lib.masker_image_emb(params["masker"], cfg, feat, hw)
  assert emb.shape == (2, 4 * g, 4 * g, 64)
  np.testing.assert_allclose(
    np.asarray(emb[:, ::4, ::4]), np.asarray(emb[:, 3::4, 3::4]), atol=1e-6
  )


def test_loss_gradients_skip_frozen_clip_and_noise_is_keyed():
  cfg = tcl_lib.tiny_config()
  params = tcl_lib.init_params(cfg, jax.random.key(0))
  img = jax.random.normal(jax.random.key(1), (3, 64, 80, 3))
  tok = np.zeros((3, 77), np.int32)
  tok[:, 0], tok[:, 1], tok[:, 2] = 49406, [320, 321, 322], 49407
  f = lambda p, k: tcl_lib.tcl_loss(p, cfg, img, tok, rng=k)[0]
  l1, g = jax.value_and_grad(f)(params, jax.random.key(2))
  assert np.isfinite(float(l1))
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g["clip"]))
  assert float(jnp.abs(g["masker"]["sim2mask"]["w"])) > 0
  assert float(f(params, jax.random.key(2))) == float(l1)
  with pytest.raises(ValueError, match="exactly one of"):
    tcl_lib.tcl_loss(params, cfg, img, tok)
  with pytest.raises(ValueError, match="at least 2"):
    tcl_lib.tcl_loss(params, cfg, img[:1], tok[:1], rng=jax.random.key(0))


def test_extended_info_nce_reduces_to_info_nce_for_identical_pooling():
  # If every caption's mask pools the same image embedding, TCL_f is plain InfoNCE.
  img = jax.random.normal(jax.random.key(0), (4, 8))
  txt = jax.random.normal(jax.random.key(1), (4, 8))
  ext = losses.extended_info_nce(jnp.broadcast_to(img[:, None], (4, 4, 8)), txt, jnp.log(10.0))
  np.testing.assert_allclose(float(ext), float(losses.info_nce(img, txt, jnp.log(10.0))), rtol=1e-6)


def test_pamr_keeps_constant_masks_and_smooths_noise():
  img = jnp.zeros((1, 3, 20, 20)).at[:, :, :, 10:].set(1.0)  # two flat regions
  const = jnp.full((1, 2, 20, 20), 0.3)
  np.testing.assert_allclose(np.asarray(tcl_inference.pamr(img, const)), 0.3, atol=1e-6)
  noisy = jax.random.uniform(jax.random.key(0), (1, 1, 20, 20))
  out = tcl_inference.pamr(img, noisy)
  assert float(out[..., :10].std()) < 0.5 * float(noisy[..., :10].std())


def test_compute_padsize_matches_original_split():
  assert clip_lib.compute_padsize(100, 130, 16) == (7, 7, 6, 6)
  assert clip_lib.compute_padsize(96, 97, 16) == (7, 8, 0, 0)
  assert clip_lib.compute_padsize(32, 48, 16) == (0, 0, 0, 0)


@pytest.mark.parametrize("k,hw", [(3, (5, 7)), (5, (4, 6)), (1, (3, 3))])
def test_subpixel_conv_equals_conv_of_nearest_upsample(k, hw):
  # The decoder's first conv runs sub-pixel on CPU; it must equal the plain conv of up2(x).
  x = jax.random.normal(jax.random.key(0), (2, *hw, 6))
  up = conv.Conv2d(4, k, upsampled_input=True)
  p = up.init(jax.random.key(1), x)
  got = up.apply(p, x)
  kernel, bias = p["params"]["kernel"], p["params"]["bias"]
  want = (
    jax.lax.conv_general_dilated(
      resize.upsample_nearest_2x(x),
      kernel,
      (1, 1),
      [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision="highest",
    )
    + bias
  )
  assert got.shape == (2, 2 * hw[0], 2 * hw[1], 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  plain = conv.Conv2d(4, k)
  np.testing.assert_allclose(
    np.asarray(plain.apply(p, resize.upsample_nearest_2x(x))), np.asarray(want), atol=1e-5
  )


def test_patch_embed_is_flax_conv_with_matmul_gradients():
  # The ViT stem (clip.PatchEmbed): the same parameter, initialisation and forward as nn.Conv,
  # bit for bit; its gradients (matmuls over the patches) equal the conv's to float32 rounding,
  # with the pixels the stride floors away getting 0.
  x = jax.random.normal(jax.random.key(1), (2, 100, 70, 3))  # 6 x 4 patches, 4 and 6 px floored
  conv = nn.Conv(32, (16, 16), strides=(16, 16), padding="VALID", use_bias=False)
  ours = clip_lib.PatchEmbed(32, 16)
  p_conv, p_ours = conv.init(jax.random.key(0), x), ours.init(jax.random.key(0), x)
  np.testing.assert_array_equal(p_conv["params"]["kernel"], p_ours["params"]["kernel"])
  np.testing.assert_array_equal(conv.apply(p_conv, x), ours.apply(p_ours, x))
  w = jax.random.normal(jax.random.key(2), (2, 6, 4, 32))  # a cotangent with no symmetry

  def loss(m, p, x):
    return jnp.sum(m.apply(p, x) * w)

  g_conv = jax.grad(loss, argnums=(1, 2))(conv, p_conv, x)
  g_ours = jax.grad(loss, argnums=(1, 2))(ours, p_ours, x)
  for a, b in zip(jax.tree.leaves(g_conv), jax.tree.leaves(g_ours)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))
  dx = g_ours[1]
  assert float(jnp.abs(dx[:, 96:]).max()) == 0 and float(jnp.abs(dx[:, :, 64:]).max()) == 0
  assert float(jnp.abs(dx[:, :96, :64]).min()) > 0
