"""Zero-shot open-vocabulary segmentation: one engine for the evaluator, the training loop's
periodic evaluation, the demo, the app and the notebook.

  prompts    template sets, class text embeddings
  pipeline   Protocol (every setting), resize/normalize, sliding windows, predict()
  metrics    intersection/union histograms, mIoU
  datasets   the benchmark task registry and readers
  evaluator  task loops over a model kind's window function (tcl_jax.kinds) on given devices
  report     tables and results.json
"""

from tcl_jax.zeroshot.evaluator import evaluate_dataset
from tcl_jax.zeroshot.evaluator import evaluate_tasks
from tcl_jax.zeroshot.evaluator import make_window_fn
from tcl_jax.zeroshot.evaluator import open_datasets
from tcl_jax.zeroshot.pipeline import predict
from tcl_jax.zeroshot.pipeline import Prediction
from tcl_jax.zeroshot.pipeline import Protocol
from tcl_jax.zeroshot.prompts import class_text_embedding

__all__ = ["Prediction", "Protocol", "class_text_embedding", "evaluate_dataset", "evaluate_tasks",
           "make_window_fn", "open_datasets", "predict"]
