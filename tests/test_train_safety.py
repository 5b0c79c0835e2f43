"""What a training run must not lose: an evaluated step is saved before it is evaluated, and an
evaluation that fails is one logged line while training goes on."""

import os

from absl import logging
import pytest
from test_train import FakeIterator
from test_train import small_config

from tcl_jax.train import checkpointing
from tcl_jax.train import loop as train
from tcl_jax.zeroshot import datasets

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_an_evaluated_step_is_saved_first_and_a_failed_evaluation_is_logged(tmp_path, monkeypatch):
  config = small_config(
    total_steps=4, checkpoint_every_steps=1000, log_every_steps=1, eval_every_steps=2
  )
  config.checkpoint.async_save = True  # the save must be on disk, not only started
  config.checkpoint.keep, config.checkpoint.keep_best = 1, 1
  on_disk, calls = [], []

  def evaluation(params, model, cfg, workdir, mesh=None):
    del params, model, cfg, mesh
    step = 2 * (len(calls) + 1)
    calls.append(step)
    on_disk.append(checkpointing.saved_steps(workdir))
    if step == 2:  # e.g. the data went missing mid-run
      raise datasets.DataError("t_voc20: data root /gone/VOCdevkit/VOC2012 does not exist")
    return {"t_voc20": {"miou": 7.0}, "average": 7.0}

  monkeypatch.setattr(train, "run_evaluation", evaluation)
  errors = []
  monkeypatch.setattr(logging, "error", lambda msg, *a: errors.append(msg % a))
  state, history = train.train_and_evaluate(config, str(tmp_path), train_iter=FakeIterator(8, 32))
  assert int(state.step) == 4 and calls == [2, 4]  # trained on after the failed evaluation
  # Each evaluation found its step's checkpoint committed (a killed evaluation loses nothing).
  assert [2 in on_disk[0], 4 in on_disk[1]] == [True, True], on_disk
  assert errors == [
    "Evaluation at step 2 failed, training goes on: t_voc20: data root /gone/VOCdevkit/VOC2012 "
    "does not exist"
  ]
  assert [h["step"] for h in history if "eval/average_miou_percent" in h] == [4]
  assert checkpointing.saved_steps(str(tmp_path)) == [4]
  assert os.path.isfile(checkpointing.config_path(str(tmp_path)))
