"""The zero-shot protocol's settings as one object, free of jax so that configs can read their
defaults from it (configs/eval.py, the training configs' `evals`)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Every setting of the zero-shot protocol, in one place (the original's configs/eval.yml and
  mmseg test pipeline; shared/EVAL_PROTOCOL.md). Evaluation, training-time evaluation, the demo
  and the app all read their defaults from here."""

  img_scale: tuple = (2048, 448)  # keep-ratio resize bound (long, short)
  crop: int = 448  # sliding-window size
  stride: int = 224
  batch: int = 8  # windows per model call
  pamr: bool = True
  kp_w: float = 0.3  # weight of the KP branch
  bg_thresh: float = 0.4  # constant background score
  template: str = "custom"  # prompt template set (zeroshot.prompts.TEMPLATES)
  class_pad: int = 0  # class lists padded to a multiple of this (0: none)

  @classmethod
  def from_config(cls, c) -> "Protocol":
    """The protocol with the fields `c` (a ConfigDict, dict or None) sets; None/missing fields
    keep their defaults."""
    values = {}
    for f in dataclasses.fields(cls):
      v = _get(c, f.name)
      if v is not None:
        values[f.name] = _CONVERT.get(f.name, lambda x: x)(v)
    return cls(**values)


# Field types as the config gives them (crop and stride may also be (h, w) pairs).
_CONVERT = {
  "img_scale": lambda v: tuple(int(x) for x in v),
  "batch": int,
  "pamr": bool,
  "kp_w": float,
  "bg_thresh": float,
  "template": str,
  "class_pad": int,
}


def _get(c, name):
  if c is None:
    return None
  try:
    return c[name] if isinstance(c, dict) else getattr(c, name)
  except (KeyError, AttributeError):
    return None
