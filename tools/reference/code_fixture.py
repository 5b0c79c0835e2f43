"""Run the authors' PyTorch CoDe (ImageTextCoDecomposition) on seeded random weights and record
what a port must match: one training forward/backward, the inference path, and a short training
trajectory. Runs only in a torch venv; nothing of the authors' code is copied: their checkout
(--code-repo) and openai/CLIP (--openai-clip, for the TextDecoder's `clip.model.Transformer`) are
imported and run, with stand-ins for what cannot run here:
  * `.cuda()` is the identity (CPU); torch.distributed is a single-process gloo group;
  * mmcv's Registry/get_logger/CheckpointLoader, webdataset, braceexpand, timm, torchvision, PIL,
    tqdm, pkg_resources and nltk are import stubs (none of them is called on this path);
  * `sclip.load` returns deep copies of ONE CLIP of the fixture's dims; every learned tensor is
    then set from the numpy recipe (seeded_state.py), so the three CLIP copies agree;
  * `random.choice` in noun_decomposition (the kg template draw) and the Gumbel-sigmoid's uniform
    noise replay draws made here with numpy, and are recorded.

  python tcl_jax/tools/reference/code_fixture.py --code-repo DIR --openai-clip DIR --out DIR \
      [--seed N] [--vision-width W] [--vision-layers L] [--steps K] [--compact DIR]

Writes fixture.npz/json, trajectory.npz/json, code_reference.pth and README.md into --out, and a
compact copy (no weights: the recipe rebuilds them; big arrays summarized) into --compact
(default <out>/compact). See the README it writes for every key.
"""

import argparse
import importlib.util
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch

# The recipe is shared with the package's parity check and tests (numpy only); loaded by path, as
# this torch venv has no jax to import tcl_jax with.
_SEEDED = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "tcl_jax", "tools", "reference", "seeded_state.py",
)  # fmt: skip
_spec = importlib.util.spec_from_file_location("seeded_state", _SEEDED)
seeded_state = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded_state)

# stream ids of the seeded inputs: generator seed [seed, stream, step]
S_IMAGES, S_GUMBEL, S_NOUNS, S_TEMPLATES, S_SEG = 1, 2, 3, 4, 5
FIXTURE_STEP = 1000  # the single-step fixture's "step" in its seeds (the trajectory uses 0..K-1)
N_NOUNS = 2
BATCH = 4
COMPACT_THRESHOLD = 8192  # compact copy: float arrays with more elements are summarized

# caption -> the record's nouns (sorted, as our records store them)
POOL = [
  ("a photo of a dog running on the beach", ["beach", "dog", "photo"]),
  ("two red apples on a wooden table next to a table lamp", ["apples", "lamp", "table"]),
  (
    "A skateboarder and a man riding a bicycle down a busy street in Seoul!",
    ["Seoul", "bicycle", "man", "skateboarder", "street"],
  ),
  (
    "aerial view of the city at night, with lights "
    + "that keep going and going " * 14
    + "under a skyline",
    ["city", "lights", "night", "skyline", "view"],
  ),
  ("a giraffe eating leaves from a tall tree", ["giraffe", "leaves", "tree"]),
  (
    "caf\u00e9 au lait & croissant \u2014 breakfast on a plate",
    ["breakfast", "croissant", "plate"],
  ),
  ("sunflowers in a field under a blue sky", ["field", "sky", "sunflowers"]),
  (
    "a lighthouse on a rocky coast with a motorcycle parked nearby",
    ["coast", "lighthouse", "motorcycle"],
  ),
]
# the single step's drawn nouns, chosen to cover: a third record noun labelled 0 (photo, lamp,
# man/street/Seoul), a noun occurring twice (table), a two-token noun (skateboarder), and a noun
# cut off by the 77-token truncation (skyline: never found, so no label)
FIXTURE_DRAWN = [
  ["dog", "beach"],
  ["table", "apples"],
  ["skateboarder", "bicycle"],
  ["lights", "skyline"],
]
CLASSNAMES = ["person", "dog", "traffic light", "sky", "car"]
LOSS_KEYS = [
  "kg_loss",
  "hlf_noun_loss",
  "tv_img_loss",
  "tv_mask_loss",
  "area_loss",
  "neg_area_loss",
  "hli_noun_loss",
  "tseg_loss",
  "hcl_loss",
]
INFER_TAGS = [("plain", False, 0.0), ("kp", False, 0.3), ("pamr_kp", True, 0.3)]
INTERMEDIATES = (  # recorded during the training forward (see attach_recorders)
  "masker_input",
  "decoded_feat_map",
  "noun_embs",
  "kg_embs",
  "text_hidden",
  "text_decoder_out",
  "text_mask_probs",
  "text_mask_logits",
  "fg_text_emb",
  "fg_image_emb",
)
COMPACT_FULL = ("masks_plain", "masks_kp", "masks_pamr_kp", "mask_soft_all")  # kept whole anyway
MARGIN = 1e-4  # the Gumbel noise keeps every noisy logit this far from the hard threshold
TOLERANCES = {
  "losses (loss/*, total_loss)": "rel 5e-5 per term",
  "grad/*": "rel 1e-4 per tensor (||g - g_ref|| / ||g_ref||)",
  "embeddings, decoded map, simmaps, masks_*, mask_soft_all": "max abs 1e-4",
  "text_mask_probs": "max abs 1e-5",
  "mask_pos_hard": "identical (every noisy logit is >= MARGIN from the threshold)",
  "tokens, word_labels": "identical",
}
TRAJ_TOLERANCES = {
  "lr": "rel 1e-6",
  "total_loss, loss/*, grad_norm": "rel 1e-4 at every step",
  "final/*": "||(final_port - init) - (final_ref - init)|| / ||final_ref - init|| <= 5e-3 per tensor",
}


def fail(msg):
  print(f"code_fixture: {msg}", file=sys.stderr)
  sys.exit(2)


def git_head(path):
  """The checkout's commit, or "unknown" (a plain copy)."""
  try:
    out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"
  except OSError:
    return "unknown"


# ----------------------------------------------------------------------------- import shims
def _stub(name, **attrs):
  mod = types.ModuleType(name)
  mod.__dict__.update(attrs)
  sys.modules[name] = mod
  return mod


class _Dummy:
  def __init__(self, *a, **k):
    pass

  BICUBIC = "bicubic"


def install_shims():
  import logging  # noqa: PLC0415

  class Registry:
    def __init__(self, name):
      self.name, self._m = name, {}

    def register_module(self, name=None):
      def deco(cls):
        self._m[name or cls.__name__] = cls
        return cls

      return deco

    def build(self, cfg):
      cfg = dict(cfg)
      return self._m[cfg.pop("type")](**cfg)

  def get_logger(name=None, *a, **k):
    return logging.getLogger(name or "code")

  mmcv = _stub("mmcv")
  mmcv.utils = _stub("mmcv.utils", Registry=Registry, get_logger=get_logger)
  mmcv.runner = _stub("mmcv.runner", CheckpointLoader=_Dummy)
  tv = _stub("torchvision")
  tv.transforms = _stub("torchvision.transforms", __getattr__=lambda n: _Dummy)
  _stub("PIL").Image = _stub("PIL.Image", BICUBIC="bicubic", Image=_Dummy)
  _stub("tqdm", tqdm=_Dummy)
  ver = types.SimpleNamespace(parse=lambda s: tuple(int(x) for x in re.findall(r"\d+", s)[:3]))
  _stub("pkg_resources", packaging=types.SimpleNamespace(version=ver))
  _stub("webdataset")
  _stub("braceexpand", braceexpand=lambda s: [s])
  _stub("timm").data = _stub("timm.data", create_transform=_Dummy)
  _stub("nltk")  # datasets/noun_parser.py imports it; we never parse (the nouns are given)


def import_authors(code_repo, openai_clip, dims):
  """The authors' modules, with sclip.load making deep copies of one CLIP of `dims`."""
  install_shims()
  clip_pkg = _stub("clip")  # only clip/model.py: clip/clip.py would import torchvision
  clip_pkg.__path__ = [os.path.join(openai_clip, "clip")]
  sys.path.insert(0, code_repo)

  import torch.distributed as dist  # noqa: PLC0415

  if not dist.is_initialized():
    store = tempfile.NamedTemporaryFile(prefix="code_fixture_gloo_", delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
  torch.Tensor.cuda = lambda self, *a, **k: self

  import sclip  # noqa: PLC0415
  import sclip.model  # noqa: PLC0415

  base = sclip.model.CLIP(
    embed_dim=dims["embed_dim"],
    image_resolution=dims["image_resolution"],
    vision_layers=dims["vision_layers"],
    vision_width=dims["vision_width"],
    vision_patch_size=dims["vision_patch_size"],
    context_length=dims["context_length"],
    vocab_size=dims["vocab_size"],
    transformer_width=dims["transformer_width"],
    transformer_heads=dims["transformer_heads"],
    transformer_layers=dims["transformer_layers"],
  ).float()

  def load(name, device="cpu", **_):
    return copy.deepcopy(base).eval(), None

  sclip.load = load
  import datasets.builder  # noqa: PLC0415
  import datasets.templates  # noqa: PLC0415
  import models  # noqa: PLC0415  (registers ImageTextCoDecomposition)
  import utils  # noqa: PLC0415

  return types.SimpleNamespace(
    sclip=sclip,
    models=models,
    builder=datasets.builder,
    templates=datasets.templates,
    utils=utils,
    gumbel=sys.modules["models.tcl.gumbel"],
    masker=sys.modules["models.tcl.masker"],
    nd=sys.modules["models.tcl.noun_decomposition"],
  )


# ----------------------------------------------------------------------------- the model
def build_model(A, code_repo, ie_freeze):
  cfg = A.utils.load_config(os.path.join(code_repo, "configs", "experiment_configs.yml"))
  cfg.model.ie_freeze = ie_freeze
  model = A.models.build_model(cfg.model)
  from omegaconf import OmegaConf  # noqa: PLC0415

  return model, OmegaConf.to_container(cfg.model, resolve=True)


def set_weights(model, recipe):
  """Load the recipe's arrays into every copy; check nothing learned was left out."""
  arrays = seeded_state.state_dict_arrays(recipe)
  full = seeded_state.code_state_dict(arrays)
  sd = model.state_dict()
  consts = {k for k in sd if k.startswith("pamr.")}
  missing = sorted(set(sd) - consts - set(full))
  extra = sorted(set(full) - set(sd))
  if missing or extra:
    fail(f"recipe does not cover the model: missing {missing[:8]}, extra {extra[:8]}")
  for k, v in full.items():
    if tuple(sd[k].shape) != v.shape:
      fail(f"{k}: recipe shape {v.shape} vs model {tuple(sd[k].shape)}")
  model.load_state_dict(
    {**{k: sd[k] for k in consts}, **{k: torch.from_numpy(v) for k, v in full.items()}}
  )
  for k, v in model.state_dict().items():  # shared tensors: every name must hold its array
    if k in full:
      assert np.array_equal(v.numpy(), full[k]), k
  return arrays


# ----------------------------------------------------------------------------- batches
def make_batch(A, step, seed, captions_records, drawn, dims):
  """The contract's batch for `captions_records` [(caption, record nouns)] and drawn nouns [B][N],
  plus what the authors' forward takes (noun-major noun_lists) and the template queue."""
  tok = A.sclip.tokenize
  B = len(captions_records)
  captions = [c for c, _ in captions_records]
  pre = A.builder.TextPreprocess(num_words=N_NOUNS, word_type="noun")
  word_labels = np.stack(
    [
      pre.get_noun_masks(c, drawn[b], rec).long().numpy()
      for b, (c, rec) in enumerate(captions_records)
    ]
  )
  templates = A.templates.full_imagenet_templates
  trng = np.random.Generator(np.random.PCG64([seed, S_TEMPLATES, step]))
  tidx = trng.integers(0, len(templates), size=(B, N_NOUNS))
  noun_tokens = np.stack(
    [
      tok([drawn[b][n] for n in range(N_NOUNS)], context_length=77 - 16, truncate=True)[
        :, 1:
      ].numpy()
      for b in range(B)
    ]
  )
  kg_tokens = np.stack(
    [
      tok(
        [templates[tidx[b, n]].format(drawn[b][n]) for n in range(N_NOUNS)], 77, truncate=True
      ).numpy()
      for b in range(B)
    ]
  )
  S = dims["image_resolution"]
  specs = {
    "images": {"rule": "image", "seed": [seed, S_IMAGES, step], "shape": [B, 3, S, S]},
    "gumbel_uniform": None,  # pick_noise draws it (it needs the model's logits)
  }
  arrays = {
    "images": seeded_state.generated_array(specs["images"]),
    "text_tokens": tok(captions, 77, truncate=True).numpy().astype(np.int32),
    "noun_tokens": noun_tokens.astype(np.int32),
    "kg_tokens": kg_tokens.astype(np.int32),
    "word_labels": word_labels.astype(np.int32),
    "kg_template_idx": tidx.astype(np.int32),
    "gumbel_uniform": None,
  }
  forward = dict(
    image=torch.from_numpy(arrays["images"]),
    noun_lists=[[drawn[b][n] for b in range(B)] for n in range(N_NOUNS)],  # noun-major
    caption=captions,
    pseudo_text_mask=torch.from_numpy(word_labels).long(),
  )
  queue = [int(tidx[b, n]) for n in range(N_NOUNS) for b in range(B)]  # all_nouns order
  info = dict(captions=captions, records=[r for _, r in captions_records], drawn=drawn)
  return arrays, specs, forward, queue, info


class Replay:
  """Feeds recorded draws to the authors' random.choice (kg templates) and Gumbel sampler."""

  def __init__(self, A):
    self.queue, self.uniform, self.templates = [], None, A.templates.full_imagenet_templates
    orig = A.masker.gumbel_sigmoid

    def choice(seq):
      assert seq is self.templates, "random.choice on something else than the kg templates"
      return seq[self.queue.pop(0)]

    def gumbel(logits, tau=1, hard=False):
      u = torch.from_numpy(self.uniform)
      assert tuple(u.shape) == tuple(logits.shape), (u.shape, logits.shape)
      real = torch.rand_like
      torch.rand_like = lambda x: u.clone().to(x.dtype)
      try:
        return orig(logits, tau=tau, hard=hard)
      finally:
        torch.rand_like = real

    A.nd.random = types.SimpleNamespace(choice=choice)
    A.masker.gumbel_sigmoid = gumbel

  def set(self, queue, uniform):
    self.queue, self.uniform = list(queue), uniform

  def check_used(self):
    assert not self.queue, f"{len(self.queue)} template draws left unused"


# ----------------------------------------------------------------------------- recording
def attach_recorders(model):
  """Record the training forward's intermediates (while rec['on'])."""
  rec = {"on": False}

  def wrap(name, post):
    orig = getattr(model, name)

    def w(*a, **k):
      out = orig(*a, **k)
      if rec["on"]:
        post(out)
      return out

    setattr(model, name, w)

  def det(x):
    return x.detach().numpy().copy()

  wrap("encode_text_features", lambda o: rec.update(text_hidden=det(o["text_hidden_embs"][-1])))
  wrap("decode_feature_map", lambda o: rec.update(decoded_feat_map=det(o)))
  wrap("get_kg_embedding", lambda o: rec.update(kg_embs=det(o)))
  wrap(
    "get_text_masks",
    lambda o: rec.update(text_mask_probs=det(o["probs"]), text_mask_logits=det(o["logits"])),
  )
  wrap("get_highlighted_text_emb", lambda o: rec.update(fg_text_emb=det(o)))
  wrap("cal_iseg_loss", lambda o: rec.update(fg_image_emb=det(o[1])))

  def hook(key, pick):
    def h(mod, inp, out):
      if rec["on"] and key not in rec:
        rec[key] = pick(out)

    return h

  ie = model.clip_image_encoder
  orig_tcl = ie.tcl_forward

  def tcl_forward(*a, **k):
    out = orig_tcl(*a, **k)
    if rec["on"]:
      rec["masker_input"] = det(out[1][0])
    return out

  ie.tcl_forward = tcl_forward
  model.clip_text_encoder.register_forward_hook(hook("noun_embs", det))
  model.text_decoder.register_forward_hook(hook("text_decoder_out", det))
  model.masker.register_forward_hook(
    hook("masks", lambda o: {"soft_all": det(o["soft_all"]), "pos_hard": det(o["pos"])})
  )
  return rec


# ----------------------------------------------------------------------------- noise, float64
def pick_noise(model, replay, batch, specs, fwd, queue, seed, step):
  """Draw the step's Gumbel noise: the first attempt a (generator seed [seed, S_GUMBEL, step, a])
  whose noisy logits all lie at least MARGIN from the hard mask's threshold (0), so that a port's
  float32 rounding cannot flip a hard-mask element. Needs one extra no-grad forward."""
  got = {}

  def hook(mod, inp, out):
    got["logits"] = inp[0].detach().double().numpy() * float(mod.w) + float(mod.b)

  h = model.masker.sim2mask.register_forward_hook(hook)
  R, hw = len(fwd["caption"]) * N_NOUNS, batch["images"].shape[-1] // 4
  try:
    replay.set(queue, np.full((R, R, hw, hw), 0.5, np.float32))
    with torch.no_grad():
      model(**fwd)
  finally:
    h.remove()
  for a in range(1000):
    spec = {
      "rule": "uniform",
      "seed": [seed, S_GUMBEL, step, a],
      "shape": list(got["logits"].shape),
    }
    u = seeded_state.generated_array(spec).astype(np.float64)
    margin = float(np.min(np.abs(got["logits"] + np.log(u / (1 - u)))))
    if margin >= MARGIN:
      batch["gumbel_uniform"] = u.astype(np.float32)
      specs["gumbel_uniform"] = {**spec, "margin": margin}
      return
  fail(f"no Gumbel noise with margin {MARGIN} in 1000 attempts")


@contextlib.contextmanager
def float64(model):
  """The model in float64: their CLIP LayerNorms cast to float32, so they run as plain
  LayerNorms; tseg's class weights (built float32) are cast to the logits' dtype."""
  ln_classes = (sys.modules["sclip.model"].LayerNorm, sys.modules["clip.model"].LayerNorm)
  for m in model.modules():
    if type(m) in ln_classes:
      m.forward = torch.nn.LayerNorm.forward.__get__(m)
  model.double()
  F = torch.nn.functional
  ce = F.cross_entropy

  def ce_any(inp, target, weight=None, **k):
    return ce(inp, target, weight=None if weight is None else weight.to(inp.dtype), **k)

  F.cross_entropy = ce_any
  try:
    yield model
  finally:
    F.cross_entropy = ce


# ----------------------------------------------------------------------------- compact copy
def compact_arrays(arrays, generated, seed, delta_init=None):
  """(npz dict, json description) of the compact copy."""
  out, summarized, kept = {}, {}, []
  for k, v in arrays.items():
    if k in generated:  # regenerated from its spec; keep a sample to check that
      s = seeded_state.summarize(k, v, seed)
      out[k + "@idx"], out[k + "@val"] = s["idx"], s["val"]
      continue
    if k.startswith("init/"):
      continue  # = the recipe's arrays
    x = v
    if delta_init is not None and k.startswith("final/") and v.size > COMPACT_THRESHOLD:
      x, k = v - delta_init[k[len("final/") :]], "delta/" + k[len("final/") :]
    small = x.size <= COMPACT_THRESHOLD or k in COMPACT_FULL
    if not np.issubdtype(x.dtype, np.floating) or small:
      out[k] = x
      kept.append(k)
      continue
    for f, val in seeded_state.summarize(k, x, seed).items():
      out[f"{k}@{f}"] = val
    summarized[k] = list(x.shape)
  return out, {"summarized": summarized, "full": kept, "generated": generated}


# ----------------------------------------------------------------------------- one step
def train_step(A, model, replay, fwd, queue, uniform):
  """Their forward, parse_losses and backward: (total loss, loss terms, {name: grad})."""
  replay.set(queue, uniform)
  model.zero_grad(set_to_none=True)
  losses, _ = model(**fwd)
  replay.check_used()
  loss, _ = A.utils.parse_losses(losses)
  if sorted(k for k in losses if "loss" in k) != sorted(LOSS_KEYS):
    fail(f"unexpected loss keys {sorted(losses)}")
  loss.backward()
  grads = {}
  for n, p in model.named_parameters():
    if p.requires_grad:
      if p.grad is None:
        fail(f"{n} is trainable but got no gradient")
      grads[n] = p.grad.detach().numpy().copy()
  return loss, losses, grads


def inference(A, model, seg_image):
  """Evaluation's path: build_seg_inference's two text embeddings, then generate_masks."""
  model.eval()
  sentences = [[t.format(c) for t in A.templates.get_template("custom")] for c in CLASSNAMES]
  class_prompt_emb = model.build_text_embedding_from_noun(CLASSNAMES)
  kp_text_emb = model.build_text_embedding_from_text_tokens(sentences)
  out = {"class_prompt_emb": class_prompt_emb.numpy(), "kp_text_emb": kp_text_emb.numpy()}
  for tag, pamr, kp in INFER_TAGS:
    m, simmap = model.generate_masks(
      torch.from_numpy(seg_image), class_prompt_emb, kp_text_emb, apply_pamr=pamr, kp_w=kp
    )
    out[f"masks_{tag}"] = m.numpy()
    out[f"simmap_{tag}"] = simmap.numpy()
  return out, sentences


def float64_run(A, code_repo, ie_freeze, recipe, replay, fwd, queue, uniform, seg_image):
  """The same step and inference in float64 (the truth float32 approximates)."""
  model, _ = build_model(A, code_repo, ie_freeze)
  set_weights(model, recipe)
  with float64(model):
    model.set_train(decoder_only=False)
    fwd64 = dict(fwd, image=fwd["image"].double())
    loss, losses, grads = train_step(A, model, replay, fwd64, queue, uniform.astype(np.float64))
    inf, _ = inference(A, model, seg_image.astype(np.float64))
  out = {"total_loss": np.float64(loss.item())}
  out.update({f"loss/{k}": np.float64(losses[k].item()) for k in LOSS_KEYS})
  out.update({f"grad/{n}": g for n, g in grads.items()})
  out.update(inf)
  return out


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = np.linalg.norm((a - b).ravel())
  n = np.linalg.norm(b.ravel())
  return float(d / n) if n > 0 else float(d)


# ----------------------------------------------------------------------------- main
def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--code-repo", required=True, help="the authors' checkout")
  ap.add_argument("--openai-clip", required=True, help="an openai/CLIP checkout")
  ap.add_argument("--out", required=True)
  ap.add_argument("--compact", default="", help="the compact copy's folder (default OUT/compact)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--vision-width", type=int, default=128, help="heads = width // 64 (CLIP's rule)")
  ap.add_argument("--vision-layers", type=int, default=4)
  ap.add_argument("--ie-freeze", type=int, default=3)
  ap.add_argument("--text-layers", type=int, default=2, help="the CLIP text tower's layers")
  ap.add_argument("--steps", type=int, default=6, help="trajectory steps")
  ap.add_argument("--ust-steps", type=int, default=3, help="steps with the masker backbone frozen")
  ap.add_argument("--clip-grad", type=float, default=0.0, help="0: 0.8 x the step-0 grad norm")
  ap.add_argument("--no-float64", action="store_true", help="skip the float64 run of the step")
  args = ap.parse_args()
  for d, what in (
    (args.code_repo, "models/tcl/codecomposition.py"),
    (args.openai_clip, "clip/model.py"),
  ):
    if not os.path.isfile(os.path.join(d, what)):
      fail(f"{d} has no {what}")
  if args.vision_width % 64 or not 1 <= args.ie_freeze <= args.vision_layers:
    fail("need a vision width that is a multiple of 64 and 1 <= ie_freeze <= vision layers")
  torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
  torch.use_deterministic_algorithms(True)
  out_dir, compact_dir = args.out, args.compact or os.path.join(args.out, "compact")
  os.makedirs(out_dir, exist_ok=True)
  os.makedirs(compact_dir, exist_ok=True)
  seed = args.seed

  dims = dict(
    embed_dim=512,  # = text width: text_dense_emb (width) is dotted with noun embeddings (embed)
    image_resolution=96,
    vision_layers=args.vision_layers,
    vision_width=args.vision_width,
    vision_heads=args.vision_width // 64,
    vision_patch_size=16,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,  # the authors hard-wire 512 (TextDecoder, bg_text)
    transformer_heads=8,
    transformer_layers=args.text_layers,
    ie_freeze=args.ie_freeze,
    n_ctx=16,
    text_decoder_layers=2,
    text_decoder_heads=8,
    decoder_layers=2,
    decoder_kernel=3,
    decoder_double=False,
    bg_image_size=224,
    mask_hw=96 // 16 * 4,
  )
  A = import_authors(args.code_repo, args.openai_clip, dims)
  model, model_cfg = build_model(A, args.code_repo, args.ie_freeze)
  recipe = json.loads(json.dumps(seeded_state.code_recipe(dims, seed)))  # as the json holds it
  set_weights(model, recipe)
  init_state = {k: v.clone() for k, v in model.state_dict().items()}
  replay = Replay(A)
  rec = attach_recorders(model)

  # ---- one training forward + backward, every learnable tensor training
  model.set_train(decoder_only=False)
  trainable = [n for n, p in model.named_parameters() if p.requires_grad]
  batch, specs, fwd, queue, info = make_batch(
    A, FIXTURE_STEP, seed, POOL[:BATCH], FIXTURE_DRAWN, dims
  )
  pick_noise(model, replay, batch, specs, fwd, queue, seed, FIXTURE_STEP)
  rec["on"] = True
  loss, losses, grads = train_step(A, model, replay, fwd, queue, batch["gumbel_uniform"])
  rec["on"] = False

  arrays = dict(batch)
  arrays["total_loss"] = np.float32(loss.item())
  for k in LOSS_KEYS:
    arrays[f"loss/{k}"] = np.float32(losses[k].item())
  for n, g in grads.items():
    arrays[f"grad/{n}"] = g
  for k in INTERMEDIATES:
    arrays[k] = rec[k]
  arrays["text_dense_emb"] = (
    sys.modules["us"].normalize(torch.from_numpy(rec["text_decoder_out"]), dim=-1).numpy()
  )
  arrays["mask_soft_all"] = rec["masks"]["soft_all"]
  arrays["mask_pos_hard"] = rec["masks"]["pos_hard"]
  with torch.no_grad():
    tt = torch.from_numpy(batch["text_tokens"]).long()
    arrays["clip_text_emb"] = model.frozen_clip.encode_text(tt).numpy()
    arrays["clip_image_emb"] = model.clip_image_encoder.clip_forward(fwd["image"]).numpy()

  # ---- inference
  seg_spec = {"rule": "image", "seed": [seed, S_SEG, 0], "shape": [1, 3, 100, 130]}
  seg_image = seeded_state.generated_array(seg_spec)
  inf, sentences = inference(A, model, seg_image)
  tok = A.sclip.tokenize
  arrays["class_noun_tokens"] = (
    tok(CLASSNAMES, context_length=61, truncate=True)[:, 1:].numpy().astype(np.int32)
  )
  arrays["kp_tokens"] = np.stack([tok(s, 77, truncate=True).numpy() for s in sentences]).astype(
    np.int32
  )
  arrays["seg_image"] = seg_image
  arrays.update(inf)

  f32_vs_f64 = {}
  if not args.no_float64:
    ref64 = float64_run(
      A,
      args.code_repo,
      args.ie_freeze,
      recipe,
      replay,
      fwd,
      queue,
      batch["gumbel_uniform"],
      seg_image,
    )
    np.savez_compressed(os.path.join(out_dir, "fixture_f64.npz"), **ref64)
    f32_vs_f64 = {k: rel_err(arrays[k], v) for k, v in ref64.items()}
    worst = max(f32_vs_f64, key=f32_vs_f64.get)
    print(
      f"float32 vs float64: worst relative error {f32_vs_f64[worst]:.2e} ({worst})", file=sys.stderr
    )

  generated = {
    "images": specs["images"],
    "gumbel_uniform": specs["gumbel_uniform"],
    "seg_image": seg_spec,
  }
  meta = dict(
    source="072jiajia/Image-Text-Co-Decomposition (the authors' code), run by "
    "tcl_jax/tools/reference/code_fixture.py on CPU, float32",
    code_commit=git_head(args.code_repo),
    openai_clip_commit=git_head(args.openai_clip),
    torch_version=torch.__version__,
    numpy_version=np.__version__,
    seed=seed,
    dims=dims,
    model_config=model_cfg,
    batch=BATCH,
    num_nouns=N_NOUNS,
    train_hw=[96, 96],
    normalization="images are already normalized (ImageNet mean/std); feed them as-is (NCHW)",
    captions=info["captions"],
    records=info["records"],
    drawn_nouns=info["drawn"],
    noun_lists_authors=fwd["noun_lists"],
    kg_templates=[
      [A.templates.full_imagenet_templates[i] for i in row]
      for row in batch["kg_template_idx"].tolist()
    ],
    kg_template_list="datasets/templates.py full_imagenet_templates (80 templates)",
    classnames=CLASSNAMES,
    kp_templates=list(A.templates.get_template("custom")),
    generate_masks_settings={t: dict(apply_pamr=p, kp_w=k) for t, p, k in INFER_TAGS},
    losses={k: float(losses[k].item()) for k in LOSS_KEYS},
    total_loss=float(loss.item()),
    trainable=trainable,
    state_dict_keys=sorted(init_state),
    float32_vs_float64=f32_vs_f64,
    tolerances=TOLERANCES,
    generated=generated,
    recipe=recipe,
    arrays={k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in arrays.items()},
  )
  np.savez_compressed(os.path.join(out_dir, "fixture.npz"), **arrays)
  with open(os.path.join(out_dir, "fixture.json"), "w") as f:
    json.dump(meta, f, indent=1)
  torch.save({"model": init_state}, os.path.join(out_dir, "code_reference.pth"))
  # compact: weights from the recipe, plus a sample of each state tensor to check regeneration
  c_arrays, c_desc = compact_arrays(arrays, generated, seed)
  for k in recipe["entries"]:
    s = seeded_state.summarize(k, init_state[k].numpy(), seed, n_sample=16)
    c_arrays[f"state/{k}@idx"], c_arrays[f"state/{k}@val"] = s["idx"], s["val"]
  np.savez_compressed(os.path.join(compact_dir, "fixture.npz"), **c_arrays)
  with open(os.path.join(compact_dir, "fixture.json"), "w") as f:
    c_meta = {**c_desc, "threshold": COMPACT_THRESHOLD, "state_samples": 16, "summary_seed": seed}
    json.dump({**meta, "compact": c_meta}, f, indent=1)
  print(
    json.dumps(
      {"losses": meta["losses"], "total_loss": meta["total_loss"], "trainable": len(trainable)}
    )
  )

  # ---- trajectory: main.py's loop
  traj_meta = trajectory(A, model, init_state, replay, args, dims, seed, out_dir, compact_dir)
  for d in (out_dir, compact_dir):
    with open(os.path.join(d, "README.md"), "w") as f:
      f.write(readme(meta, traj_meta, args))


def train_loop(A, model, replay, steps, train_cfg, seed, dtype=torch.float32, pick=True):
  """main.py's do_training for len(steps) steps: UST switch, zero_grad -> forward ->
  parse_losses -> backward -> clip_grad_norm_ -> optimizer.step -> lr_scheduler.step."""
  # main.py: set_train before build_optimizer (every parameter joins a group, frozen ones too)
  model.set_train(decoder_only=train_cfg.ust_steps > 0)
  optimizer = A.utils.build_optimizer(train_cfg, model)
  lr_scheduler = A.utils.build_scheduler(train_cfg, optimizer)
  decay = {id(p) for p in optimizer.param_groups[0]["params"]}
  named = dict(model.named_parameters())
  init = {n: p.detach().numpy().copy() for n, p in named.items()}
  model.train()
  optimizer.zero_grad()
  hist = {"lr": [], "grad_norm": [], "total_loss": []}
  trained, with_grads = set(), []
  ust_check = True
  for k, (batch, specs, fwd, queue, _) in enumerate(steps):
    if ust_check and train_cfg.ust_steps and k >= train_cfg.ust_steps:
      model.set_train(decoder_only=False)
      ust_check = False
    if pick:
      pick_noise(model, replay, batch, specs, fwd, queue, seed, k)
    fwd = dict(fwd, image=fwd["image"].to(dtype))
    optimizer.zero_grad()
    replay.set(
      queue, batch["gumbel_uniform"].astype(np.float64 if dtype == torch.float64 else np.float32)
    )
    losses, _ = model(**fwd)
    replay.check_used()
    loss, _ = A.utils.parse_losses(losses)
    loss.backward()
    got = [n for n, p in model.named_parameters() if p.grad is not None]
    trained |= set(got)
    with_grads.append(len(got))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_grad)
    hist["lr"].append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    lr_scheduler.step()
    hist["grad_norm"].append(float(grad_norm))
    hist["total_loss"].append(float(loss.detach()))
    for n in LOSS_KEYS:
      hist.setdefault(f"loss/{n}", []).append(float(losses[n].detach()))
    print(
      f"{dtype} step {k}: lr {hist['lr'][-1]:.4g} loss {float(loss):.6f} grad_norm"
      f" {float(grad_norm):.4f} ({len(got)} tensors with grads)",
      file=sys.stderr,
    )
  final = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in trained}
  return dict(
    hist=hist,
    init=init,
    final=final,
    trained=sorted(trained),
    with_grads=with_grads,
    decay=sorted(n for n in trained if id(named[n]) in decay),
  )


def trajectory(A, model, init_state, replay, args, dims, seed, out_dir, compact_dir):
  from omegaconf import OmegaConf  # noqa: PLC0415

  model.load_state_dict(init_state)
  K = args.steps
  steps = []
  for k in range(K):
    nrng = np.random.Generator(np.random.PCG64([seed, S_NOUNS, k]))
    cr = [POOL[(k * BATCH + i) % len(POOL)] for i in range(BATCH)]
    drawn = [[rec[j] for j in nrng.permutation(len(rec))[:N_NOUNS]] for _, rec in cr]
    steps.append(make_batch(A, k, seed, cr, drawn, dims))

  clip_grad = args.clip_grad
  if clip_grad <= 0:  # make clipping bind on some steps: 0.8 x the step-0 norm
    model.set_train(decoder_only=args.ust_steps > 0)
    batch, specs, fwd, queue, _ = steps[0]
    pick_noise(model, replay, batch, specs, fwd, queue, seed, 0)
    train_step(A, model, replay, fwd, queue, batch["gumbel_uniform"])
    norms = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    clip_grad = float(torch.linalg.vector_norm(norms)) * 0.8
    model.zero_grad(set_to_none=True)
  train_cfg = OmegaConf.create(
    dict(
      total_steps=K + 2,
      warmup_steps=2,
      ust_steps=args.ust_steps,
      base_lr=1e-3,
      min_lr=1e-4,
      weight_decay=0.05,
      clip_grad=clip_grad,
      lr_scheduler=dict(name="cosine"),
      optimizer=dict(name="adamw", eps=1e-6, betas=[0.9, 0.999]),
    )
  )
  r = train_loop(A, model, replay, steps, train_cfg, seed)
  hist = r["hist"]
  arrays = {}
  for k, (batch, *_) in enumerate(steps):
    for name, v in batch.items():
      arrays[f"step/{k}/{name}"] = v
  for n in r["trained"]:
    arrays[f"init/{n}"] = r["init"][n]
    arrays[f"final/{n}"] = r["final"][n]
  for key, v in hist.items():
    arrays[key] = np.asarray(v, np.float64)
  generated = {}
  for k in range(K):
    for name in ("images", "gumbel_uniform"):
      generated[f"step/{k}/{name}"] = steps[k][1][name]

  f32_vs_f64 = {}
  if not args.no_float64:  # the same steps (same batches and noise) in float64
    m64, _ = build_model(A, args.code_repo, args.ie_freeze)
    set_weights(m64, json.loads(json.dumps(seeded_state.code_recipe(dims, seed))))
    with float64(m64):
      r64 = train_loop(A, m64, replay, steps, train_cfg, seed, torch.float64, pick=False)
    for key, v in r64["hist"].items():
      f32_vs_f64[key] = float(np.max(np.abs(np.asarray(hist[key]) / np.asarray(v) - 1)))
    for n in r["trained"]:
      d32, d64 = r["final"][n] - r["init"][n], r64["final"][n] - r64["init"][n]
      f32_vs_f64[f"delta/{n}"] = rel_err(d32, d64)
    np.savez_compressed(
      os.path.join(out_dir, "trajectory_f64.npz"),
      **{k: np.asarray(v, np.float64) for k, v in r64["hist"].items()},
      **{f"final/{n}": v for n, v in r64["final"].items()},
    )
    worst = max(f32_vs_f64, key=f32_vs_f64.get)
    print(
      f"trajectory float32 vs float64: worst {f32_vs_f64[worst]:.2e} ({worst})", file=sys.stderr
    )

  meta = dict(
    seed=seed,
    steps=K,
    batch=BATCH,
    num_nouns=N_NOUNS,
    train_hw=[96, 96],
    train=dict(
      total_steps=train_cfg.total_steps,
      warmup_steps=train_cfg.warmup_steps,
      ust_steps=train_cfg.ust_steps,
      lr=train_cfg.base_lr,
      min_lr=train_cfg.min_lr,
      lr_note="effective rates: main.py's batch scaling (x batch*world/4096) not applied",
      warmup_start_factor=1e-4,
      weight_decay=train_cfg.weight_decay,
      clip_grad=clip_grad,
      adam_eps=1e-6,
      adam_betas=[0.9, 0.999],
      precision="float32 (no autocast, no GradScaler)",
    ),
    step_inputs=[
      dict(
        captions=s[4]["captions"],
        records=s[4]["records"],
        drawn_nouns=s[4]["drawn"],
        noun_lists_authors=s[2]["noun_lists"],
      )
      for s in steps
    ],
    weights="code_reference.pth / the recipe in fixture.json: the step-0 state",
    trained_params=r["trained"],
    tensors_with_grads_per_step=r["with_grads"],
    weight_decay_params=r["decay"],
    float32_vs_float64=f32_vs_f64,
    tolerances=TRAJ_TOLERANCES,
    generated=generated,
    arrays={k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in arrays.items()},
  )
  np.savez_compressed(os.path.join(out_dir, "trajectory.npz"), **arrays)
  with open(os.path.join(out_dir, "trajectory.json"), "w") as f:
    json.dump(meta, f, indent=1)
  c_arrays, c_desc = compact_arrays(arrays, generated, seed, delta_init=r["init"])
  np.savez_compressed(os.path.join(compact_dir, "trajectory.npz"), **c_arrays)
  with open(os.path.join(compact_dir, "trajectory.json"), "w") as f:
    c_meta = {**c_desc, "threshold": COMPACT_THRESHOLD, "summary_seed": seed}
    json.dump({**meta, "compact": c_meta}, f, indent=1)
  print(
    json.dumps(
      {
        "steps": K,
        "clip_grad": clip_grad,
        "final_loss": hist["total_loss"][-1],
        "trained": len(r["trained"]),
      }
    )
  )
  return meta


README = """# Reference fixture: the authors' PyTorch CoDe on seeded random weights

Made by `tcl_jax/tools/reference/code_fixture.py` (torch venv only), which imports and runs the
authors' code (github 072jiajia/Image-Text-Co-Decomposition at `code_commit`, the experiment config
`configs/experiment_configs.yml` over `default.yml`) and openai/CLIP's `clip/model.py` (their
TextDecoder's `Transformer`), on CPU in float32, with stand-ins only for what cannot run here
(`.cuda()`, a 1-process gloo group, mmcv/webdataset/timm/torchvision/nltk import stubs, and
`sclip.load`, which returns deep copies of one CLIP). Command:

    {cmd}

The compact copy (`tests/fixtures/code_tiny`) holds everything but the weights (the recipe rebuilds
them) and summarizes big float arrays; the full copy (`--out`) also has `code_reference.pth` and
the float64 runs. Nothing here needs torch to read: `tcl_jax/tools/reference/seeded_state.py`.

## Dims (`fixture.json` -> `dims`, `model_config`)
CLIP ViT: width {vw}, {vh} heads, {vl} layers, patch {ps}, resolution {res} ({grid}x{grid} grid); text:
width {tw} = embed dim (the authors hard-wire 512: their TextDecoder and `bg_text` are 512 wide and
`text_dense_emb` (width) is dotted with noun embeddings (embed dim)), {th} heads, {tl} layers, context {L},
vocab 49408. `ie_freeze` {ie}: the masker's backbone is CLIP block {ie}.. (state-dict keys keep CLIP's
numbering: `masker.image_encoder.backbone.transformer.resblocks.{ie}.*`), its input the output of
block {iem1}. Masker decoder: GDecoder, 2 ResConv (double false: one conv each), 3x3, GELU,
LayerNorm2d, upsample x2 each, on the vision width (the backbone has no ln_post/proj: the
authors' CLIPImageFeatureEncoder moves them into `clip_proj` before cloning), then `image_proj`
(a copy of ln_post + proj) to 512; masks are {hw}x{hw}. Loss weights: w_kg 8, w_tcl 0.1, w_tv 1,
pos_area 0.25, w_pos_area 0.5, w_neg_area 0.05, w_hcl 0.5, w_tseg 1, both highlighting prompts on.

## Weights: the recipe (`fixture.json` -> `recipe`, seed {seed})
`seeded_state.state_dict_arrays(recipe)` regenerates every learned tensor: one
`np.random.Generator(np.random.PCG64(seed))`, keys in sorted order, `z = standard_normal(shape)`
per key; `normal`: center + scale z; `like`: value[base] + scale z (the masker's copies of CLIP
tensors, moved 0.01 away); `const`: center (no draw); float32. CLIP follows openai's init stds
(LayerNorms 1 + 0.05 z, biases 0.05 z); the decoder's tanh gates are opened (0.5 + 0.1 z);
sim2mask w ~ 10, b ~ -1; text_mask_w ~ 10, text_mask_b ~ 0.5; `learnable_image_bg` 0.5 z,
`bg_text` and the prompt ctx 0.02 z; the three InfoNCE logit scales are log(1/0.07) + 0.3 / - 0.2 /
+ 0.1 (tcli / tclf / hcl). The one CLIP is keyed `frozen_clip.*`; `seeded_state.code_state_dict`
expands it to all the authors' names (`clip_text_encoder.prompt_learner.clip_model.*`,
`clip_text_encoder.text_encoder.*`, `clip_image_encoder.clip_visual.*`,
`clip_image_encoder.clip_proj.{{ln.weight, ln.bias, proj}}`, `prompt_learner.token_prefix` = the SOT
embedding), i.e. every key of `code_reference.pth` but the constant `pamr.*` kernels. The tool
asserts the expansion covers the model and equals what the model holds; the compact copy keeps 16
sampled values of each recipe tensor as the torch model held them (`state/<key>@idx`, `@val`).

## The batch (contract format) and the authors' row order
B = {B} captions, N = {N} drawn nouns each (`fixture.json` -> `captions`, `records`, `drawn_nouns`:
{noun_rows}). The drawn nouns were chosen to cover: other record nouns labelled 0 (photo, lamp,
man/street/Seoul), a noun occurring twice (table), a two-token noun (skateboarder: skate + boarder),
and a noun cut off by the 77-token truncation (skyline, in a caption longer than 77 tokens: no label).
The authors' forward takes `noun_lists` noun-major ([N][B], `noun_lists_authors`): every per-row
quantity of their 2B = {R} rows (noun_embs, kg_embs, text mask rows, fg embeddings, masks, the Gumbel
noise) is in row order k = n * B + b; the contract's (ours) is r = b * N + n.
Inputs are regenerated with `seeded_state.generated_array(spec)` (`fixture.json` -> `generated`):
images are uniform pixels normalized with the ImageNet mean/std (already normalized: feed as-is).
The Gumbel noise U ([{R}, {R}, {hw}, {hw}], images x nouns, both noun-major) is the first seeded draw
whose noisy logits all lie >= {margin} from the hard threshold (spec `margin`), so a port's float32
rounding cannot flip a hard-mask element. The kg templates (`kg_template_idx` [B, N] into the 80
`full_imagenet_templates`) replace their `random.choice`.

## fixture.npz
| key | meaning |
| --- | --- |
| `images` [{B},3,{res},{res}] | the batch's images (NCHW, normalized) |
| `text_tokens` [{B},77] | `tokenize(caption, 77, truncate=True)` (their sclip tokenizer) |
| `noun_tokens` [{B},{N},60] | `tokenize(noun, 61, truncate=True)[:, 1:]`: the prompt learner's tokens |
| `kg_tokens` [{B},{N},77] | `tokenize(template.format(noun), 77, truncate=True)` |
| `word_labels` [{B},77] | their `TextPreprocess.get_noun_masks(caption, drawn, record)`: -1, 0 at any record noun's runs, n+1 at drawn noun n's |
| `kg_template_idx` [{B},{N}] | the template each noun drew |
| `gumbel_uniform` [{R},{R},{hw},{hw}] | U; logistic noise = log(U / (1 - U)); authors' row and column order |
| `loss/<term>`, `total_loss` | the 9 weighted terms of their forward (kg_loss, hlf_noun_loss, tv_img_loss, tv_mask_loss, area_loss, neg_area_loss, hli_noun_loss, tseg_loss, hcl_loss) and their sum (`utils.parse_losses`) |
| `grad/<torch name>` | d total_loss / d each of the {nuntrained} trainable tensors after `set_train(decoder_only=False)` (list below) |
| `masker_input` [{L1},{B},{vw}] | CLIP block {iem1}'s output (LND), the masker backbone's input |
| `decoded_feat_map` [{B},512,{hw},{hw}] | `decode_feature_map(images)`: decoder + image_proj, normalized over C (before the N-fold repeat) |
| `noun_embs` [{R},512] | the prompt learner's noun embeddings (normalized), noun-major |
| `kg_embs` [{R},512] | the template sentences through the plain CLIP text tower (normalized, no grad) |
| `text_hidden` [77,{B},512] | the frozen CLIP text tower's last block output for the captions (LND, before ln_final): the TextDecoder's input |
| `text_decoder_out` [77,{B},512], `text_dense_emb` | TextDecoder output, and it normalized over C |
| `text_mask_logits` [{B},{N1},77] | per caption: a zero background logit, then each noun's `simmap * text_mask_w + text_mask_b` (the tseg logits) |
| `text_mask_probs` [{R},77] | softmax over those {N1}, noun rows only, noun-major |
| `fg_text_emb`, `fg_image_emb` [{R},512] | the highlighted caption's and the highlighted (masked + learned background) image's CLIP embeddings (normalized) |
| `mask_soft_all` [{R},{R},{hw},{hw}] | sigmoid(w * simmap + b) of every image row against every noun row |
| `mask_pos_hard` [{R},1,{hw},{hw}] | the straight-through hard mask of each row's own noun |
| `clip_text_emb`, `clip_image_emb` [{B},512] | plain CLIP embeddings of the batch (not normalized; a CLIP-level check) |
| `class_noun_tokens` [5,60], `class_prompt_emb` [5,512] | classes ({classes}) through the prompt learner (`build_text_embedding_from_noun`) |
| `kp_tokens` [5,9,77], `kp_text_emb` [5,512] | the 9 `custom` templates x classes through the plain CLIP text tower, ensembled (`build_text_embedding_from_text_tokens`) |
| `seg_image` [1,3,100,130] | an inference image whose sides are not multiples of the patch |
| `masks_<tag>` [1,5,100,130], `simmap_<tag>` [1,5,28,36] | `generate_masks(seg_image, class_prompt_emb, kp_text_emb, ...)`: `plain` (no PAMR, kp_w 0), `kp` (kp_w 0.3), `pamr_kp` (PAMR, kp_w 0.3) |

Trainable tensors ({nuntrained}, `fixture.json` -> `trainable`, named_parameters order):
{trained}

## Training trajectory (`trajectory.json`, `trajectory.npz`)
{steps} steps of main.py's loop from the same weights: `set_train(decoder_only=True)` (UST: the masker
backbone frozen) for steps 0..{ustm1}, then `set_train(decoder_only=False)`; their `build_optimizer`
(AdamW, eps 1e-6, betas 0.9/0.999, wd 0.05; no decay on 1-D tensors and `.bias`, so 0-d scalars
ARE decayed: {ndecay} decayed tensors, `weight_decay_params`) and `build_scheduler` (LinearLR from
1e-4x over 2 warmup steps, then cosine to min_lr, chained by SequentialLR; {total} steps in all; peak lr
1e-3, min 1e-4, effective rates: no batch scaling); per step zero_grad -> forward -> parse_losses
-> backward -> `clip_grad_norm_(model.parameters(), {clip:.6g})` (0.8 x the step-0 norm, so it binds
early) -> step -> scheduler step; float32, no GradScaler. Tensors with gradients per step:
{grads_per_step}. Each step's captions and drawn nouns (a seeded permutation of the record, first
N) are in `step_inputs`.

| key | meaning |
| --- | --- |
| `step/<k>/<input>` | step k's batch in the contract's format (as above) and its Gumbel noise |
| `lr` [{steps}] | the learning rate each step used (read before `optimizer.step()`; main.py logs the next one) |
| `total_loss`, `loss/<term>`, `grad_norm` [{steps}] | per step, before its update; grad_norm is what `clip_grad_norm_` returns (pre-clip) |
| `init/<name>`, `final/<name>` | every tensor any step trained, before step 0 and after the last step |

## Compact copy
No weights (the recipe), no `init/*` (the recipe's arrays). Inputs listed in `compact.generated`
(images, Gumbel noise, seg_image, per step too) are regenerated from their specs; `<key>@idx`,
`<key>@val` hold a sample to check that. Float arrays over {thr} elements (but the masks) are
summarized by `seeded_state.summarize(key, x, seed)`: `<key>@norm`, `<key>@idx`/`@val` ({nsample}
elements), `<key>@proj` ({nproj} standard-normal projections; |proj - proj_ref| / norm_ref estimates
the relative error); in trajectory.npz the big trained tensors appear as `delta/<name>@*`
(final - init). `compact.summarized` / `compact.full` list them.

## Tolerances a faithful float32 port meets on CPU
Losses: relative 5e-5 per term; gradients: relative (||g - g_ref|| / ||g_ref|| per tensor) 1e-4;
embeddings, decoded map, simmaps, masks: max abs 1e-4; text mask probs: max abs 1e-5; the hard
mask and all tokens/labels: identical. Trajectory: lr relative 1e-6; losses and grad_norm relative
1e-4 at every step; per trained tensor ||D_port - D_ref|| / ||D_ref|| <= 5e-3, D = final - init.
The authors' own float32 vs float64 (same inputs; `float32_vs_float64` in the json files): losses
{e_loss}, gradients {e_grad}, masks {e_mask}, class embeddings {e_emb}; trajectory losses
{te_loss}, grad_norm {te_norm}, deltas {te_delta}.

## What may surprise a porter (reproduced, not fixed)
- Rows are noun-major (k = n * B + b), and the masker contrasts 2B image rows with 2B noun rows:
  the same image with its other noun is a negative (`soft_neg` has 2B - 1 = {Rm} columns); InfoNCE
  labels are arange(2B).
- The Gumbel noise is drawn once per training forward, inside `Sim2Mask.forward` (masker.forward ->
  `gumbel_sigmoid(hard=True)`, `torch.rand_like(logits)`), on [2B, 2B, h, w]; the hard mask is
  straight-through, so its gradient is that of the noisy sigmoid (tau 1). Inference
  (`forward_seg`) is deterministic.
- `ret["mask"]`/`ret["neg_mask"]` are detached logs; the area, TV and feature losses use the
  non-detached soft masks; `hli_noun_loss` uses the hard mask, upsampled with nearest, and
  `learnable_image_bg` (224x224) resized bilinear (align_corners False, no antialias) to the image.
- The fg image goes through the frozen CLIP with normal attention and the class token
  (`clip_forward`): gradients reach the masks and `learnable_image_bg` through frozen CLIP.
- `decode_feature_map` runs the frozen CLIP under no_grad and takes block {iem1}'s output (a
  forward hook), then the masker backbone block(s) with MaskCLIP's last attention (each token
  attends only to itself), the decoder and image_proj, then normalizes over C.
- noun embeddings: [SOT, 16 ctx, tokenize(noun, 61)[1:]] (77), EOT index = 17 + argmax of the
  noun tokens, text_projection, normalized. kg sentences and kp templates skip the prompt.
- The TextDecoder (openai `Transformer(512, 2, 8)`) has no attention mask (bidirectional) and its
  output is not projected, yet it is dotted with the projected noun embeddings.
- Text masks: softmax over [0 (background), noun logits] per caption token; `tseg_loss` is
  cross_entropy(ignore_index -1, class weights [0.5, 1, ..., 1]): a weighted mean over labelled
  tokens, other record nouns are background.
- Highlighted caption: the caption's token embeddings (no positions) mixed with `bg_text` by the
  text-mask probability, except SOT, EOT and after EOT (mask 1; `handle_padded_tokens`' padded
  branch uses `eos_token_value`, harmless since both are 1), then the frozen CLIP text tower
  (causal) at EOT = argmax(tokens).
- `set_train` touches only the masker image encoder and the CLIP copies: sim2mask, the logit
  scales, backgrounds, text decoder, text_mask_w/b and the prompt ctx train in both phases
  (UST: 47 tensors, then 59). AdamW decays 0-d scalars (their rule tests `len(shape) == 1`).
- `model.eval()` leaves `clip_text_encoder` in train mode (their `train()` override calls
  `.train()` on it); no dropout anywhere, so no effect. PAMR is built in `__init__` (its kernels
  are `pamr.*` buffers), unlike TCL's lazy one.
- generate_masks is TCL's: the masker's masks use `class_prompt_emb` (prompt learner on the bare
  class name), the kp branch uses the template-ensembled `kp_text_emb`.
"""


def _fmt_worst(errs, prefix):
  ks = [k for k in errs if k.startswith(prefix)]
  if not ks:
    return "not measured (--no-float64)"
  k = max(ks, key=errs.get)
  return f"{errs[k]:.1e} (`{k}`)"


def readme(meta, traj, args):
  d, e, te = meta["dims"], meta["float32_vs_float64"], traj["float32_vs_float64"]
  trained = "\n".join(f"  {i + 1:2d}. `{n}`" for i, n in enumerate(meta["trainable"]))
  noun_rows = ", ".join(f"{b}: {meta['drawn_nouns'][b]}" for b in range(meta["batch"]))
  return README.format(
    cmd=" ".join(["python tcl_jax/tools/reference/code_fixture.py"] + sys.argv[1:]),
    seed=meta["seed"],
    vw=d["vision_width"],
    vh=d["vision_heads"],
    vl=d["vision_layers"],
    ps=d["vision_patch_size"],
    res=d["image_resolution"],
    grid=d["image_resolution"] // d["vision_patch_size"],
    tw=d["transformer_width"],
    th=d["transformer_heads"],
    tl=d["transformer_layers"],
    ie=d["ie_freeze"],
    iem1=d["ie_freeze"] - 1,
    L1=(d["image_resolution"] // d["vision_patch_size"]) ** 2 + 1,
    N1=meta["num_nouns"] + 1,
    hw=d["mask_hw"],
    B=meta["batch"],
    N=meta["num_nouns"],
    R=meta["batch"] * meta["num_nouns"],
    Rm=meta["batch"] * meta["num_nouns"] - 1,
    L=d["context_length"],
    nuntrained=len(meta["trainable"]),
    trained=trained,
    noun_rows=noun_rows,
    classes=", ".join(meta["classnames"]),
    steps=traj["steps"],
    ustm1=traj["train"]["ust_steps"] - 1,
    total=traj["train"]["total_steps"],
    clip=traj["train"]["clip_grad"],
    ndecay=len(traj["weight_decay_params"]),
    grads_per_step=traj["tensors_with_grads_per_step"],
    e_loss=_fmt_worst(e, "loss/"),
    e_grad=_fmt_worst(e, "grad/"),
    e_mask=_fmt_worst(e, "masks_"),
    e_emb=_fmt_worst(e, "class_prompt_emb"),
    te_loss=_fmt_worst(te, "loss/"),
    te_norm=_fmt_worst(te, "grad_norm"),
    te_delta=_fmt_worst(te, "delta/"),
    margin=MARGIN,
    thr=COMPACT_THRESHOLD,
    nsample=seeded_state.N_SAMPLE,
    nproj=seeded_state.N_PROJ,
  )


if __name__ == "__main__":
  main()
