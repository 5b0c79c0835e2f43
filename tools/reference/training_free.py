"""Run MaskCLIP's, SCLIP's, ClearCLIP's and NACLIP's own dense-feature code on a random-weight CLIP
and write the parity fixtures of tests/test_training_free.py. NOT part of the tcl_jax package.

Each --METHOD DIR is a plain checkout of the authors' repository (README.md beside this file says
which commits); nothing is copied from them: their modules are imported and run on CPU, with thin
stand-ins for what they import and need not run here (mmseg's/mmengine's registries and segmentor
base classes, torchvision, and for MaskCLIP the few mmcv 1.x bricks its ViT builds on).

Outputs in --out:
  clip_visual.npz  the shared inputs: OpenAI-named visual state dict ("sd/visual.*", float32),
                   images [k, H, W, 3] (NHWC, already normalized), text [N, E] (L2-normalized),
                   and "config" (a JSON string of the CLIP dims)
  <method>.npz     features [k, gh, gw, E] (projected patch tokens before normalization) and
                   logits [k, N, H, W] (each method's own forward, cosine logits bilinearly
                   upsampled to the window), one file per method given
Usage: python tools/reference/training_free.py --sclip DIR --clearclip DIR --naclip DIR \
         --maskclip DIR --out tests/fixtures/training_free/
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import types

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

# Small dims: 4 heads of 16, 3 blocks; trained grid 7 x 7 (112 px), windows 96 x 80 (6 x 5
# patches, non-square: exercises each method's positional-embedding resize, up and down).
CONFIG = dict(
  embed_dim=32,
  image_resolution=112,
  vision_layers=3,
  vision_width=64,
  vision_patch_size=16,
  vision_heads=4,
)
WINDOWS, WINDOW_HW, CLASSES = 2, (96, 80), 3


def module(name, **attrs):
  """A stand-in module `name` (its parent packages created as needed) with `attrs`."""
  parts = name.split(".")
  for i in range(1, len(parts)):
    parent = ".".join(parts[:i])
    if parent not in sys.modules:
      sys.modules[parent] = types.ModuleType(parent)
      sys.modules[parent].__path__ = []
  m = sys.modules.get(name) or types.ModuleType(name)
  m.__path__ = getattr(m, "__path__", [])
  for k, v in attrs.items():
    setattr(m, k, v)
  sys.modules[name] = m
  if len(parts) > 1:
    setattr(sys.modules[".".join(parts[:-1])], parts[-1], m)
  return m


def load_file(name, path):
  """Import the file `path` as module `name` (relative imports resolve against `name`)."""
  spec = importlib.util.spec_from_file_location(name, path)
  m = importlib.util.module_from_spec(spec)
  sys.modules[name] = m
  spec.loader.exec_module(m)
  return m


class Registry:
  def __init__(self, *a, **k):
    pass

  def register_module(self, *a, **k):
    return lambda cls: cls


def random_state_dict(seed):
  """An OpenAI-named CLIP visual state dict with CLIP-like init scales (float32 numpy)."""
  rng = np.random.default_rng(seed)
  c = CONFIG
  w, p, layers = c["vision_width"], c["vision_patch_size"], c["vision_layers"]
  g = c["image_resolution"] // p
  n = lambda *s, std: (rng.standard_normal(s) * std).astype(np.float32)  # noqa: E731
  # A small stem (tokens of variance ~3e-3 into ln_pre) makes LayerNorm's eps visible: MaskCLIP's
  # 1e-6 against CLIP's 1e-5 moves the features by ~1e-3, ten times the tests' tolerance.
  stem = 0.05
  sd = {
    "visual.conv1.weight": n(w, 3, p, p, std=stem * (3 * p * p) ** -0.5),
    "visual.class_embedding": n(w, std=stem * w**-0.5),
    "visual.positional_embedding": n(g * g + 1, w, std=stem * w**-0.5),
    "visual.proj": n(w, c["embed_dim"], std=w**-0.5),
  }
  for ln in ("visual.ln_pre", "visual.ln_post"):
    sd[ln + ".weight"] = 1 + n(w, std=0.1)
    sd[ln + ".bias"] = n(w, std=0.1)
  proj_std = w**-0.5 * (2 * layers) ** -0.5
  for i in range(layers):
    b = f"visual.transformer.resblocks.{i}."
    sd[b + "attn.in_proj_weight"] = n(3 * w, w, std=w**-0.5)
    sd[b + "attn.in_proj_bias"] = n(3 * w, std=0.05)
    sd[b + "attn.out_proj.weight"] = n(w, w, std=proj_std)
    sd[b + "attn.out_proj.bias"] = n(w, std=0.05)
    sd[b + "mlp.c_fc.weight"] = n(4 * w, w, std=(2 * w) ** -0.5)
    sd[b + "mlp.c_fc.bias"] = n(4 * w, std=0.05)
    sd[b + "mlp.c_proj.weight"] = n(w, 4 * w, std=proj_std)
    sd[b + "mlp.c_proj.bias"] = n(w, std=0.05)
    for ln in ("ln_1", "ln_2"):
      sd[b + ln + ".weight"] = 1 + n(w, std=0.1)
      sd[b + ln + ".bias"] = n(w, std=0.1)
  return sd


def visual_only(sd):
  return {k[len("visual.") :]: torch.from_numpy(v) for k, v in sd.items()}


def segmentor_self(**attrs):
  """The attributes a segmentor's forward_feature reads (it is called unbound on this)."""
  return types.SimpleNamespace(**attrs)


def openai_stubs():
  """What SCLIP's/NACLIP's segmentor modules import besides their own clip/model.py."""
  module("torchvision.transforms.functional")
  module("torchvision.ops.misc", FrozenBatchNorm2d=nn.Module)
  module("mmseg.models.segmentors", BaseSegmentor=object)
  module("mmseg.models.data_preprocessor", SegDataPreProcessor=object)
  module("mmseg.registry", MODELS=Registry())
  module("mmengine.structures", PixelData=dict)
  module("pamr", PAMR=None)
  module("prompts.imagenet_template", openai_imagenet_template=[], sub_imagenet_template=[])


def run_sclip(repo, sd, images, text):
  openai_stubs()
  model = load_file("sclip_clip_model", os.path.join(repo, "clip", "model.py"))
  module("clip")  # clip_segmentor.py imports the package; forward_feature does not use it
  seg = load_file("sclip_segmentor", os.path.join(repo, "clip_segmentor.py"))
  c = CONFIG
  vt = model.VisionTransformer(
    c["image_resolution"],
    c["vision_patch_size"],
    c["vision_width"],
    c["vision_layers"],
    c["vision_heads"],
    c["embed_dim"],
  ).eval()
  vt.load_state_dict(visual_only(sd))
  # CLIP.encode_image (clip/model.py:455-456): the tower on the image in the weights' dtype.
  net = types.SimpleNamespace(
    visual=vt, encode_image=lambda img, **kw: vt(img.type(vt.conv1.weight.dtype), **kw)
  )
  with torch.no_grad():
    feats = net.encode_image(images, return_all=True, csa=True)[:, 1:]
    logits = seg.CLIPForSegmentation.forward_feature(
      segmentor_self(net=net, query_features=text), images
    )
  return feats, logits


def run_naclip(repo, sd, images, text):
  openai_stubs()
  model = load_file("naclip_clip_model", os.path.join(repo, "clip", "model.py"))
  module("clip")
  seg = load_file("naclip_segmentor", os.path.join(repo, "naclip.py"))
  c = CONFIG
  vt = model.VisionTransformer(
    c["image_resolution"],
    c["vision_patch_size"],
    c["vision_width"],
    c["vision_layers"],
    c["vision_heads"],
    c["embed_dim"],
  ).eval()
  vt.load_state_dict(visual_only(sd))
  vt.set_params("reduced", "naclip", 5.0)  # NACLIP.__init__ defaults (naclip.py:21)
  net = types.SimpleNamespace(
    visual=vt, encode_image=lambda img, **kw: vt(img.type(vt.conv1.weight.dtype), **kw)
  )
  with torch.no_grad():
    feats = net.encode_image(images, return_all=True)[:, 1:]
    logits = seg.NACLIP.forward_feature(
      segmentor_self(net=net, query_features=text, align_corners=False), images
    )
  return feats, logits


def run_clearclip(repo, sd, images, text):
  openai_stubs()
  module("open_clip").__path__ = [os.path.join(repo, "open_clip")]
  tr = load_file("open_clip.transformer", os.path.join(repo, "open_clip", "transformer.py"))
  module("BLIP.models.blip_retrieval", blip_retrieval=None)
  module("gem")
  sys.modules["open_clip"].tokenizer = None
  sys.modules["open_clip"].create_model = None
  seg = load_file("clearclip_segmentor", os.path.join(repo, "clearclip_segmentor.py"))
  c = CONFIG
  # As open_clip's build_model_from_openai_state_dict builds OpenAI's ViT (model.py:451-499):
  # QuickGELU, open_clip's LayerNorm in float32.
  vt = tr.VisionTransformer(
    image_size=c["image_resolution"],
    patch_size=c["vision_patch_size"],
    width=c["vision_width"],
    layers=c["vision_layers"],
    heads=c["vision_heads"],
    mlp_ratio=4.0,
    output_dim=c["embed_dim"],
    act_layer=tr.QuickGELU,
    norm_layer=tr.LayerNorm,
  ).eval()
  vt.load_state_dict(visual_only(sd))
  # CLIP.encode_image (open_clip/model.py:265-267), normalize=False.
  net = types.SimpleNamespace(visual=vt, encode_image=lambda img, mt, ir: vt(img, mt, ir))
  fake = segmentor_self(
    net=net,
    query_features=text,
    clip_type="CLIP",
    model_type="ClearCLIP",  # the method (base_config.py's default is 'vanilla')
    ignore_residual=True,
    patch_size=vt.patch_size,
  )
  with torch.no_grad():
    feats = net.encode_image(images, "ClearCLIP", True)
    logits = seg.ClearCLIPSegmentation.forward_feature(fake, images)
  return feats, logits


def maskclip_stubs():
  """mmcv 1.x bricks MaskCLIP's ViT builds on, with mmcv's semantics and parameter names (what
  MaskCLIP's tools/maskclip_utils/convert_clip_weights.py maps OpenAI's weights to)."""

  class BaseModule(nn.Module):
    def __init__(self, init_cfg=None):
      super().__init__()
      self.init_cfg = init_cfg

  def build_norm_layer(cfg, num_features, postfix=""):
    assert cfg["type"] == "LN"
    return f"ln{postfix}", nn.LayerNorm(num_features, eps=cfg.get("eps", 1e-5))

  def build_conv_layer(cfg, *args, **kwargs):
    return nn.Conv2d(*args, **kwargs)

  def build_activation(cfg):
    return {"GELU": nn.GELU, "QuickGELU": None}[cfg["type"]]()

  class MultiheadAttention(BaseModule):
    """mmcv.cnn.bricks.transformer.MultiheadAttention: identity + attn(q, q, q)."""

    def __init__(
      self,
      embed_dims,
      num_heads,
      attn_drop=0.0,
      proj_drop=0.0,
      dropout_layer=None,
      init_cfg=None,
      batch_first=False,
      **kwargs,
    ):
      super().__init__(init_cfg)
      self.batch_first = batch_first
      self.attn = nn.MultiheadAttention(embed_dims, num_heads, attn_drop, **kwargs)

    def forward(self, query, identity=None):
      identity = query if identity is None else identity
      q = query.transpose(0, 1) if self.batch_first else query
      out = self.attn(q, q, q, need_weights=False)[0]
      return identity + (out.transpose(0, 1) if self.batch_first else out)

  class FFN(BaseModule):
    """mmcv's FFN: layers = [Sequential(Linear, act, Dropout)] * (num_fcs - 1) + [Linear,
    Dropout]; identity + layers(x)."""

    def __init__(
      self,
      embed_dims,
      feedforward_channels,
      num_fcs=2,
      act_cfg=None,
      ffn_drop=0.0,
      dropout_layer=None,
      add_identity=True,
      init_cfg=None,
    ):
      super().__init__(init_cfg)
      layers, d = [], embed_dims
      for _ in range(num_fcs - 1):
        layers.append(
          nn.Sequential(
            nn.Linear(d, feedforward_channels), build_activation(act_cfg), nn.Dropout(0)
          )
        )
        d = feedforward_channels
      layers += [nn.Linear(feedforward_channels, embed_dims), nn.Dropout(0)]
      self.layers = nn.Sequential(*layers)

    def forward(self, x, identity=None):
      return (x if identity is None else identity) + self.layers(x)

  class BaseDecodeHead(nn.Module):
    """mmseg's decode head base, as far as MaskClipHead's inference uses it."""

    def __init__(self, in_channels, channels, *, num_classes, in_index=-1, **kwargs):
      super().__init__()
      self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
      self.in_index = in_index

    def _transform_inputs(self, inputs):
      return inputs[self.in_index]

  def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

  noop = lambda *a, **k: None  # noqa: E731
  module("mmcv.cnn", build_norm_layer=build_norm_layer, build_conv_layer=build_conv_layer)
  module("mmcv.cnn.bricks.transformer", FFN=FFN, MultiheadAttention=MultiheadAttention)
  module("mmcv.cnn.utils.weight_init", constant_init=noop, kaiming_init=noop, trunc_normal_=noop)
  module("mmcv.runner", BaseModule=BaseModule, ModuleList=nn.ModuleList, _load_checkpoint=noop)
  module("mmcv.runner.base_module", BaseModule=BaseModule)
  module("mmcv.utils", to_2tuple=to_2tuple, print_log=noop)
  module("mmseg.utils", get_root_logger=noop)
  module("mmseg.models.builder", BACKBONES=Registry(), HEADS=Registry())
  module("mmseg.models.backbones")
  module("mmseg.models.decode_heads.decode_head", BaseDecodeHead=BaseDecodeHead)


def maskclip_weights(sd):
  """OpenAI's visual weights in MaskCLIP's names, as its convert_clip_weights.py renames them
  (ViT branch): (backbone state dict, {'proj': {'weight': proj^T}})."""
  out = {}
  for key, v in visual_only(sd).items():
    v = v.float()
    if key == "proj":
      continue
    if key == "class_embedding":
      key, v = "cls_token", v[None, None, :]
    elif key == "positional_embedding":
      key, v = "pos_embed", v[None, :, :]
    elif key == "conv1.weight":
      key = "patch_embed.projection.weight"
    elif "ln_pre" in key:
      key = "ln0." + key.split(".")[-1]
    elif "ln_post" in key:
      key = "ln1." + key.split(".")[-1]
    elif "transformer" in key:
      key = "layers." + key[len("transformer.resblocks.") :]
      key = key.replace("mlp", "ffn.layers").replace("c_fc", "0.0").replace("c_proj", "1")
      key = key.replace("attn", "attn.attn") if "attn" in key else key.replace("ln_", "ln")
    out[key] = v
  return out, {"proj": {"weight": torch.from_numpy(sd["visual.proj"]).float().t()}}


def run_maskclip(repo, sd, images, text):
  maskclip_stubs()
  root = os.path.join(repo, "mmseg")
  load_file("mmseg.ops", os.path.join(root, "ops", "wrappers.py"))
  embed = load_file("mmseg.models.utils.embed", os.path.join(root, "models", "utils", "embed.py"))
  module("mmseg.models.utils", PatchEmbed=embed.PatchEmbed)
  vit = load_file("mmseg.models.backbones.vit", os.path.join(root, "models", "backbones", "vit.py"))
  head_mod = load_file(
    "mmseg.models.decode_heads.maskclip_head",
    os.path.join(root, "models", "decode_heads", "maskclip_head.py"),
  )
  c = CONFIG
  # configs/_base_/models/maskclip_vit16.py's backbone, at these dims.
  backbone = vit.VisionTransformer(
    img_size=(c["image_resolution"], c["image_resolution"]),
    patch_size=c["vision_patch_size"],
    patch_bias=False,
    in_channels=3,
    embed_dims=c["vision_width"],
    num_layers=c["vision_layers"],
    num_heads=c["vision_heads"],
    mlp_ratio=4,
    out_indices=-1,
    qkv_bias=True,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.0,
    with_cls_token=True,
    output_cls_token=False,
    norm_cfg=dict(type="LN", eps=1e-6),
    act_cfg=dict(type="GELU"),
    patch_norm=False,
    pre_norm=True,
    final_norm=True,
    return_qkv=True,
    interpolate_mode="bicubic",
    num_fcs=2,
    norm_eval=False,
  )
  backbone.eval()  # (its train() override returns None, so no chaining)
  weights, projs = maskclip_weights(sd)
  backbone.load_state_dict(weights)
  tmp = tempfile.mkdtemp()
  torch.save(text.clone(), os.path.join(tmp, "text.pth"))
  torch.save(projs, os.path.join(tmp, "proj.pth"))
  real_load = torch.load
  # The head loads its files with map_location='cuda'; this machine has no GPU.
  torch.load = lambda f, map_location=None, **k: real_load(f, map_location="cpu", **k)
  try:
    head = head_mod.MaskClipHead(
      vit=True,
      in_channels=c["vision_width"],
      channels=0,
      num_classes=text.shape[0],
      text_categories=text.shape[0],
      text_channels=c["embed_dim"],
      text_embeddings_path=os.path.join(tmp, "text.pth"),
      visual_projs_path=os.path.join(tmp, "proj.pth"),
      in_index=-1,
    ).eval()
  finally:
    torch.load = real_load
  with torch.no_grad():
    outs = backbone(images)
    v = outs[-1][3]  # [k, C, gh, gw]: the value path, ln_post'ed (vit.py:431-461)
    feats = head.proj(v).permute(0, 2, 3, 1)  # MaskClipHead.forward (maskclip_head.py:80)
    seg = head(outs)  # [k, N, gh, gw] cosine logits (cls_seg)
    # EncoderDecoder.encode_decode: resize to the input, bilinear, align_corners=False.
    logits = F.interpolate(seg, size=images.shape[2:], mode="bilinear", align_corners=False)
  return feats.flatten(1, 2), logits


RUNNERS = {
  "maskclip": run_maskclip,
  "sclip": run_sclip,
  "clearclip": run_clearclip,
  "naclip": run_naclip,
}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name in RUNNERS:
    ap.add_argument(f"--{name}", metavar="DIR", help=f"a checkout of {name}'s repository")
  ap.add_argument("--out", required=True)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.manual_seed(args.seed)
  sd = random_state_dict(args.seed)
  rng = np.random.default_rng(args.seed + 1)
  images = rng.standard_normal((WINDOWS, *WINDOW_HW, 3)).astype(np.float32)
  text = rng.standard_normal((CLASSES, CONFIG["embed_dim"])).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  np.savez(
    os.path.join(args.out, "clip_visual.npz"),
    images=images,
    text=text,
    config=json.dumps(CONFIG),
    **{f"sd/{k}": v for k, v in sd.items()},
  )
  p = CONFIG["vision_patch_size"]
  grid = (WINDOW_HW[0] // p, WINDOW_HW[1] // p)
  for name, run in RUNNERS.items():
    repo = getattr(args, name)
    if not repo:
      continue
    feats, logits = run(
      repo, sd, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(text)
    )
    feats = feats.reshape(WINDOWS, *grid, -1).numpy().astype(np.float32)
    np.savez(os.path.join(args.out, f"{name}.npz"), features=feats, logits=logits.numpy())
    print(f"{name}: features {feats.shape}, logits {tuple(logits.shape)}")


if __name__ == "__main__":
  main()
