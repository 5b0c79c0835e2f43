"""Prompts for zero-shot segmentation: the original's template sets (datasets/templates.py) and the
prompt-ensembled class text embedding every front end uses."""

from typing import Sequence

import numpy as np

from tcl_jax import tokenizer

# ----------------------------------------------------------------------------------------------
# Prompt templates (the original's datasets/templates.py)
# ----------------------------------------------------------------------------------------------

_SUBSET_TEMPLATES = (
  "itap of a {}.",
  "a bad photo of a {}.",
  "a origami {}.",
  "a photo of the large {}.",
  "a {} in a video game.",
  "art of the {}.",
  "a photo of the small {}.",
)
_MASKCLIP_TEMPLATES = (
  "there is a {} in the scene.",
  "there is the {} in the scene.",
  "this is a {} in the scene.",
  "this is the {} in the scene.",
  "this is one {} in the scene.",
)
TEMPLATES = {
  # 'custom': the 7-template ImageNet subset + many/plural (the default of configs/eval.yml).
  "custom": _SUBSET_TEMPLATES + ("a photo of many {}.", "a photo of {}s."),
  "subset": _SUBSET_TEMPLATES,
  "simple": ("a photo of a {}.",),
  "plural": ("a photo of {}s.",),
  "identity": ("{}",),
  "maskclip": _MASKCLIP_TEMPLATES,
  "subset+maskclip": _SUBSET_TEMPLATES + _MASKCLIP_TEMPLATES,
}


def get_templates(name: str) -> tuple:
  if name not in TEMPLATES:
    raise ValueError(f"unknown template set {name!r}; known: {', '.join(TEMPLATES)}")
  return TEMPLATES[name]


def pad_classes(names: Sequence[str], multiple: int) -> list:
  """names rounded up to a multiple of `multiple` with copies of the first name (shape reuse: a
  copy ties with the first class and argmax keeps the first, so a copy never wins a pixel)."""
  names = list(names)
  if multiple > 0:
    names += names[:1] * (-len(names) % multiple)
  return names


def class_text_embedding(model, params, classnames: Sequence[str], template: str = "custom"):
  """[N, E] prompt-ensembled, normalized text embeddings of the class names, through the model
  kind's `text_embedding` hook (tcl_jax.kinds)."""
  templates = get_templates(template)
  names = list(classnames)
  prompts = [t.format(c) for c in names for t in templates]
  tokens = np.asarray(tokenizer.tokenize(prompts)).reshape(len(names), len(templates), -1)
  return model.text_embedding(params, tokens)
