"""notebooks/zero_shot_demo.ipynb executed headlessly (papermill, a real Jupyter kernel) with the
reference fixture's weights and a generated image."""

import os

import numpy as np
from PIL import Image
import pytest

from tcl_jax import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "zero_shot_demo.ipynb")
FIXTURE = os.path.join(REPO, "..", "shared", "fixtures", "tcl_tiny", "tcl_reference.pth")


@pytest.mark.skipif(not os.path.exists(FIXTURE), reason=f"needs the reference fixture {FIXTURE}")
def test_notebook_runs_and_draws(tmp_path):
  import papermill

  Image.fromarray(demo.draw_sample(200, 150)).save(tmp_path / "photo.png")
  out = tmp_path / "executed.ipynb"
  # papermill raises PapermillExecutionError naming the cell if any cell fails.
  nb = papermill.execute_notebook(
    NOTEBOOK,
    str(out),
    kernel_name="python3",
    cwd=REPO,
    progress_bar=False,
    parameters=dict(
      CHECKPOINT=FIXTURE,
      IMAGE=str(tmp_path / "photo.png"),
      CLASSES="sky, grass, house",
      BG_THRESH=0.1,
    ),
  )

  def outputs(tag):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, tag
    return cells[0].get("outputs", [])

  for tag in ("overlay", "masks", "simmaps", "effects"):
    images = [o for o in outputs(tag) if "image/png" in o.get("data", {})]
    assert images, f"cell {tag!r} drew no image"
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "after compile:" in text and "s per image" in text
  assert "image 200x150, classes: ['sky', 'grass', 'house']" in text
  # The overlay cell shows the overlay with its legend: the image's width, legend below.
  import base64
  import io

  png = [o for o in outputs("overlay") if "image/png" in o.get("data", {})][0]["data"]["image/png"]
  shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB"))
  legend = demo.legend(["sky", "grass", "house"], 200)
  assert shown.shape == (150 + legend.shape[0], 200, 3)
  np.testing.assert_array_equal(shown[150:], legend)


def test_notebook_segments_with_a_code_checkpoint(tmp_path):
  # The authors' CoDe layout (tests/code_files.py), converted: the notebook's Segmenter goes through
  # the CoDe kind (its prompt on the class names). No ../shared needed.
  import code_files
  import papermill
  import torch_files

  from tcl_jax.weights import loading
  from tcl_jax.weights import model_files

  rng = np.random.default_rng(5)
  clip = code_files.openai_clip(rng, grid=6)
  pth = torch_files.save(
    {"model": torch_files.state_dict(code_files.code_state_dict(rng, clip))}, tmp_path / "code.pth"
  )
  cfg, params = loading.load_torch(str(pth), text_decoder_heads=1)
  model_files.save_checkpoint(str(tmp_path / "ckpt"), cfg, params)
  Image.fromarray(demo.draw_sample(120, 100)).save(tmp_path / "photo.png")
  nb = papermill.execute_notebook(
    NOTEBOOK,
    str(tmp_path / "executed.ipynb"),
    kernel_name="python3",
    cwd=REPO,
    progress_bar=False,
    parameters=dict(
      CHECKPOINT=str(tmp_path / "ckpt"),
      IMAGE=str(tmp_path / "photo.png"),
      CLASSES="sky, traffic light",
      BG_THRESH=0.1,
    ),
  )
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "classes: ['sky', 'traffic light']" in text and "(code model)" in text
