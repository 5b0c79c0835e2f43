"""Zero-shot open-vocabulary segmentation: one engine for the evaluator, the training loop's
periodic evaluation, the demo, the app and the notebook.

  protocol   Protocol: every setting of a protocol; PROTOCOLS: TCL's and SCLIP's (jax-free)
  sclip_names  SCLIP's class names per benchmark (its protocol's queries)
  prompts    template sets, class text embeddings
  pipeline   resize/normalize, sliding windows, predict()
  metrics    intersection/union histograms, mIoU
  datasets   the benchmark task registry and readers
  evaluator  task loops over a model kind's window function (tcl_jax.kinds) on given devices
  report     tables and results.json

The names below are loaded on first use, so `tcl_jax.zeroshot.protocol` stays light.
"""

import importlib

_PUBLIC = {
  "Prediction": "pipeline",
  "predict": "pipeline",
  "PROTOCOLS": "protocol",
  "Protocol": "protocol",
  "class_text_embedding": "prompts",
  "evaluate_dataset": "evaluator",
  "evaluate_tasks": "evaluator",
  "make_window_fn": "evaluator",
  "open_datasets": "evaluator",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name not in _PUBLIC:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
