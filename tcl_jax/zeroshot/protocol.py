"""The zero-shot protocols' settings as objects, free of jax so that configs can read their
defaults from them (configs/eval.py, the training configs' `evals`).

Two named protocols (`--config.protocol=tcl|sclip`, `PROTOCOLS`): TCL's, the original's own
(the default everywhere), and SCLIP's, which later training-free papers (ClearCLIP, NACLIP, ...)
report under. Each field says where its value comes from.
"""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Every setting of a zero-shot protocol, in one place. Evaluation, training-time evaluation,
  the demo and the app all read their defaults from here. The defaults are TCL's (the original's
  configs/eval.yml and mmseg 0.27's test pipeline; shared/EVAL_PROTOCOL.md)."""

  img_scale: tuple = (2048, 448)  # keep-ratio resize bound (long, short)
  crop: int = 448  # sliding-window size
  stride: int = 224
  batch: int = 8  # windows per model call
  pamr: bool = True
  kp_w: float = 0.3  # weight of the KP branch
  bg_thresh: float = 0.4  # constant background score
  template: str = "custom"  # prompt template set (zeroshot.prompts.TEMPLATES)
  class_pad: int = 0  # class lists padded to a multiple of this (0: none)
  # The fields below are TCL's behaviour at their defaults; SCLIP's protocol sets them.
  name: str = "tcl"
  # mean/std (0-255, RGB) of the image normalisation; None: the CLIP's own (mmseg img_norm_cfg).
  image_mean: Optional[tuple] = None
  image_std: Optional[tuple] = None
  # Prompt ensemble: "mean" averages the templates' raw text embeddings, then normalises (TCL's
  # build_text_embedding); "mean_of_normalized" normalises each template's first (SCLIP's).
  ensemble: str = "mean"
  # "dataset": the task's class names, its background a constant bg_thresh channel (TCL);
  # "sclip": SCLIP's names (zeroshot.sclip_names), several per class, background included.
  class_names: str = "dataset"
  # > 0: labels from softmax(logit_scale x scores) over all names, a class scoring the max of its
  # names' probabilities (SCLIP). 0: argmax of the scores as they are (TCL).
  logit_scale: float = 0.0
  prob_thd: float = 0.0  # > 0: pixels whose class probability is below it become class 0
  # > 0: classes (but 0) predicted on at most this fraction of the non-class-0 pixels are dropped.
  area_thd: float = 0.0
  # ((task, ((field, value), ...)), ...): per-benchmark settings (SCLIP's per-dataset configs).
  per_task: tuple = ()

  @classmethod
  def from_config(cls, c, name: Optional[str] = None, given: Optional[set] = None) -> "Protocol":
    """The protocol `name` (default: `c.protocol`, else "tcl") with the fields of `c` (a
    ConfigDict, dict or None; None/missing fields keep the protocol's values).

    TCL's protocol takes every field `c` has (configs/eval.py's defaults are its values; a
    training run's `evals` may tune them). Another named protocol keeps its own values and takes
    from `c` only the compute settings (batch, class_pad) and the fields in `given` (those the
    command line set), since a config's TCL values are not meant for it."""
    name = name or _get(c, "protocol") or "tcl"
    base = get(name)
    values = {}
    for f in dataclasses.fields(cls):
      if f.name in ("name", "per_task"):
        continue
      if name != "tcl" and f.name not in _COMPUTE and f.name not in (given or ()):
        continue
      v = _get(c, f.name)
      if v is not None:
        values[f.name] = _CONVERT.get(f.name, lambda x: x)(v)
    # What the command line sets wins over the protocol's per-benchmark values too.
    per_task = tuple(
      (t, tuple((k, v) for k, v in fields if k not in values)) for t, fields in base.per_task
    )
    return dataclasses.replace(base, **values, per_task=per_task)

  def for_task(self, task: str) -> "Protocol":
    """This protocol with `task`'s own settings applied (per_task)."""
    for t, fields in self.per_task:
      if t == task:
        return dataclasses.replace(self, **dict(fields), per_task=())
    return dataclasses.replace(self, per_task=()) if self.per_task else self


# SCLIP's protocol (Wang et al., ECCV 2024), wangf3014/SCLIP at b56bd30: clip_segmentor.py
# (CLIPForSegmentation's defaults and postprocess_result), configs/cfg_*.py (per dataset),
# configs/cls_*.txt (names), prompts/imagenet_template.py (templates).
SCLIP = Protocol(
  name="sclip",
  img_scale=(2048, 336),  # cfg_*.py: Resize(scale=(2048, 336), keep_ratio=True)
  crop=224,  # slide_crop=224
  stride=112,  # slide_stride=112
  pamr=False,  # pamr_steps=0
  kp_w=0.0,  # no KP branch (TCL's own; a TCL checkpoint under this protocol runs without it)
  bg_thresh=0.0,  # unused: class_names="sclip" scores the background by its names
  template="openai_imagenet",  # openai_imagenet_template (CLIP's 80)
  # SegDataPreProcessor(mean=[122.771, 116.746, 104.094], std=[68.501, 66.632, 70.323])
  image_mean=(122.771, 116.746, 104.094),
  image_std=(68.501, 66.632, 70.323),
  ensemble="mean_of_normalized",  # per template: feature /= norm; mean; /= norm
  class_names="sclip",  # get_cls_idx(name_path)
  logit_scale=40.0,  # logit_scale=40
  prob_thd=0.0,  # prob_thd=0.0
  area_thd=0.0,  # area_thd=None
  per_task=(
    # cfg_voc21.py: logit_scale=65, prob_thd=0.1, area_thd=0.1
    ("voc", (("logit_scale", 65.0), ("prob_thd", 0.1), ("area_thd", 0.1))),
    # cfg_context60.py, cfg_coco_object.py: logit_scale=50, prob_thd=0.1
    ("context", (("logit_scale", 50.0), ("prob_thd", 0.1))),
    ("coco_object", (("logit_scale", 50.0), ("prob_thd", 0.1))),
    ("cityscapes", (("img_scale", (2048, 560)),)),  # cfg_city_scapes.py
    ("coco_stuff", (("img_scale", (2048, 448)),)),  # cfg_coco_stuff164k.py
  ),
)

PROTOCOLS = {"tcl": Protocol(), "sclip": SCLIP}


def get(name: str) -> Protocol:
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
  return PROTOCOLS[name]


# Settings of how the work is batched, not of what is computed.
_COMPUTE = ("batch", "class_pad")

# Field types as the config gives them (crop and stride may also be (h, w) pairs).
_CONVERT = {
  "img_scale": lambda v: tuple(int(x) for x in v),
  "batch": int,
  "pamr": bool,
  "kp_w": float,
  "bg_thresh": float,
  "template": str,
  "class_pad": int,
  "image_mean": lambda v: tuple(float(x) for x in v),
  "image_std": lambda v: tuple(float(x) for x in v),
  "ensemble": str,
  "class_names": str,
  "logit_scale": float,
  "prob_thd": float,
  "area_thd": float,
}


def _get(c, name):
  if c is None:
    return None
  try:
    return c[name] if isinstance(c, dict) else getattr(c, name)
  except (KeyError, AttributeError):
    return None
