"""Prompts for zero-shot segmentation: the original's template sets (datasets/templates.py) and the
prompt-ensembled class text embedding every front end uses."""

from typing import Sequence

import jax.numpy as jnp
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
# CLIP's 80 ImageNet prompts (OpenAI's CLIP notebook), in the order SCLIP's
# prompts/imagenet_template.py lists them (the order only moves the ensemble's float sums). The
# same list, in the same order, is datasets/templates.py's full_imagenet_templates ("full"), from
# which CoDe draws its knowledge-guidance prompts (tcl_jax/data/nouns.py).
_OPENAI_IMAGENET_TEMPLATES = (
  "a bad photo of a {}.",
  "a photo of many {}.",
  "a sculpture of a {}.",
  "a photo of the hard to see {}.",
  "a low resolution photo of the {}.",
  "a rendering of a {}.",
  "graffiti of a {}.",
  "a bad photo of the {}.",
  "a cropped photo of the {}.",
  "a tattoo of a {}.",
  "the embroidered {}.",
  "a photo of a hard to see {}.",
  "a bright photo of a {}.",
  "a photo of a clean {}.",
  "a photo of a dirty {}.",
  "a dark photo of the {}.",
  "a drawing of a {}.",
  "a photo of my {}.",
  "the plastic {}.",
  "a photo of the cool {}.",
  "a close-up photo of a {}.",
  "a black and white photo of the {}.",
  "a painting of the {}.",
  "a painting of a {}.",
  "a pixelated photo of the {}.",
  "a sculpture of the {}.",
  "a bright photo of the {}.",
  "a cropped photo of a {}.",
  "a plastic {}.",
  "a photo of the dirty {}.",
  "a jpeg corrupted photo of a {}.",
  "a blurry photo of the {}.",
  "a photo of the {}.",
  "a good photo of the {}.",
  "a rendering of the {}.",
  "a {} in a video game.",
  "a photo of one {}.",
  "a doodle of a {}.",
  "a close-up photo of the {}.",
  "a photo of a {}.",
  "the origami {}.",
  "the {} in a video game.",
  "a sketch of a {}.",
  "a doodle of the {}.",
  "a origami {}.",
  "a low resolution photo of a {}.",
  "the toy {}.",
  "a rendition of the {}.",
  "a photo of the clean {}.",
  "a photo of a large {}.",
  "a rendition of a {}.",
  "a photo of a nice {}.",
  "a photo of a weird {}.",
  "a blurry photo of a {}.",
  "a cartoon {}.",
  "art of a {}.",
  "a sketch of the {}.",
  "a embroidered {}.",
  "a pixelated photo of a {}.",
  "itap of the {}.",
  "a jpeg corrupted photo of the {}.",
  "a good photo of a {}.",
  "a plushie {}.",
  "a photo of the nice {}.",
  "a photo of the small {}.",
  "a photo of the weird {}.",
  "the cartoon {}.",
  "art of the {}.",
  "a drawing of the {}.",
  "a photo of the large {}.",
  "a black and white photo of a {}.",
  "the plushie {}.",
  "a dark photo of a {}.",
  "itap of a {}.",
  "graffiti of the {}.",
  "a toy {}.",
  "itap of my {}.",
  "a photo of a cool {}.",
  "a photo of a small {}.",
  "a tattoo of the {}.",
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
  "openai_imagenet": _OPENAI_IMAGENET_TEMPLATES,  # SCLIP's protocol
  "full": _OPENAI_IMAGENET_TEMPLATES,  # the original's name; CoDe's knowledge-guidance prompts
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


def class_text_embedding(
  model, params, classnames: Sequence[str], template: str = "custom", ensemble: str = "mean"
):
  """[N, E] prompt-ensembled, normalized text embeddings of the class names, through the model
  kind's `text_embedding` hook (tcl_jax.kinds), which averages the templates' raw embeddings
  ("mean"). With "mean_of_normalized" (SCLIP's) each prompt's embedding is normalised first: the
  hook is asked for one prompt at a time (one template: its normalised embedding), then the
  mean is normalised."""
  templates = get_templates(template)
  names = list(classnames)
  if getattr(model, "class_text", None) is not None:  # the kind builds them from the names
    if ensemble != "mean":
      raise ValueError(f"ensemble {ensemble!r} is not available for this model kind")
    return model.class_text(params, names, templates)
  prompts = [t.format(c) for c in names for t in templates]
  tokens = np.asarray(tokenizer.tokenize(prompts))
  if ensemble == "mean":
    return model.text_embedding(params, tokens.reshape(len(names), len(templates), -1))
  if ensemble != "mean_of_normalized":
    raise ValueError(f"unknown ensemble {ensemble!r}; known: mean, mean_of_normalized")
  each = model.text_embedding(params, tokens.reshape(len(prompts), 1, -1))  # [N*T, E], normalised
  mean = jnp.mean(jnp.reshape(each.astype(jnp.float32), (len(names), len(templates), -1)), axis=1)
  return mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)
