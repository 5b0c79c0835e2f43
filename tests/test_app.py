"""The web app in a real headless browser: Debian's chromium driven by selenium through
chromium-driver (no browser downloads). Starts `python -m tcl_jax.app` on 127.0.0.1, uploads a
generated image, types classes, runs, and checks the rendered result, the page's messages for bad
input, and the usage errors of the command line.

TCL_APP_SCREENSHOT=path saves the result's screenshot there (docs/app_screenshot.png is made so).
"""

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import numpy as np
from PIL import Image
import pytest

from tcl_jax import demo
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.weights import model_files

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Only the browser tests need them; the command line's usage errors are tested everywhere.
needs_chromium = pytest.mark.skipif(
  not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
  reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
  f"apt-get install chromium chromium-driver",
)

W, H = 320, 240
CLASSES = ["sky", "grass", "house"]
WAIT_S = 300  # the first request compiles, on a busy 2-core machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("app")
  cfg = tcl_lib.tiny_config()
  model_files.save_checkpoint(tmp / "ckpt", cfg, tcl_lib.init_params(cfg, jax.random.key(0)))
  port = _free_port()
  url = f"http://127.0.0.1:{port}/"
  log = open(tmp / "server.log", "w+")
  env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp / "gradio"))
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "tcl_jax.app",
      f"--checkpoint={tmp / 'ckpt'}",
      "--host=127.0.0.1",
      f"--port={port}",
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
    env=env,
  )
  deadline = time.time() + 180
  while True:
    try:
      urllib.request.urlopen(url, timeout=5).read()
      break
    except OSError:
      log.seek(0)
      assert proc.poll() is None and time.time() < deadline, f"app did not start:\n{log.read()}"
      time.sleep(1)
  yield url, tmp, log
  proc.terminate()
  proc.wait(30)
  log.seek(0)
  assert "Traceback" not in log.read()  # bad input ended in messages, not server errors


@pytest.fixture(scope="module")
def browser():
  os.environ["SE_OFFLINE"] = "true"  # selenium must not look for or download drivers
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  with tempfile.TemporaryDirectory() as profile:
    for a in (
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--disable-background-networking",
      "--disable-component-update",
      "--no-first-run",
      "--disable-sync",
      f"--user-data-dir={profile}",
      "--window-size=1400,1100",
    ):
      opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
      yield driver
    finally:
      driver.quit()


def _by():
  from selenium.webdriver.common.by import By

  return By


def _wait(driver, cond, timeout=WAIT_S):
  from selenium.webdriver.support.ui import WebDriverWait

  return WebDriverWait(driver, timeout, poll_frequency=0.5).until(cond)


def _open(driver, url):
  driver.get(url)
  _wait(driver, lambda d: d.find_elements(_by().CSS_SELECTOR, "#image input[type=file]"), 120)


def _fill(driver, image_path, classes, bg_thresh=None):
  by = _by()
  if image_path:
    driver.find_element(by.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image_path))
    _wait(driver, lambda d: d.find_elements(by.CSS_SELECTOR, "#image img"), 60)
  box = driver.find_element(by.CSS_SELECTOR, "#classes textarea")
  box.clear()
  box.send_keys(classes)
  if bg_thresh is not None:
    from selenium.webdriver.common.keys import Keys

    num = driver.find_element(by.CSS_SELECTOR, "#bg_thresh input[type=number]")
    num.send_keys(Keys.CONTROL, "a")
    num.send_keys(str(bg_thresh), Keys.TAB)
  driver.find_element(by.CSS_SELECTOR, "#run").click()


def _message(driver, text):
  """Wait for a message containing text anywhere in the page."""
  return _wait(
    driver,
    lambda d: d.find_elements(_by().XPATH, f"//*[contains(normalize-space(text()), {text!r})]"),
    120,
  )


def _output_image(driver, url):
  by = _by()
  img = _wait(
    driver,
    lambda d: [
      e
      for e in d.find_elements(by.CSS_SELECTOR, "#overlay img")
      if e.get_attribute("src") and int(e.get_attribute("naturalWidth") or 0) > 0
    ],
  )[0]
  src = img.get_attribute("src")
  assert src.startswith(url)
  with urllib.request.urlopen(src, timeout=30) as r:
    return img, np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


@needs_chromium
def test_segment_in_browser(server, browser, tmp_path):
  url, _, _ = server
  by = _by()
  photo = demo.draw_sample(W, H)
  Image.fromarray(photo).save(tmp_path / "photo.png")
  _open(browser, url)
  _fill(browser, tmp_path / "photo.png", " sky, grass , house", bg_thresh=0.1)
  img, out = _output_image(browser, url)

  # Rendered at the right size: the image, then the legend strip naming the classes.
  leg = demo.legend(CLASSES, W)
  assert (int(img.get_attribute("naturalWidth")), int(img.get_attribute("naturalHeight"))) == (
    W,
    H + leg.shape[0],
  )
  assert img.size["width"] > 100 and img.size["height"] > 100
  np.testing.assert_array_equal(out[H:], leg)
  # Each pixel is the photo, or the photo blended with one class colour.
  blends = [
    np.round((photo.astype(np.float32) + c) / 2).astype(np.uint8)
    for c in demo.colours(len(CLASSES))
  ]
  which = np.stack([(out[:H] == photo).all(-1)] + [(out[:H] == b).all(-1) for b in blends])
  assert which.any(0).all()
  label = which.argmax(0)

  # The table (class -> % of pixels) agrees with the picture.
  cells = browser.find_element(by.CSS_SELECTOR, "#shares").text.split("\n")
  assert cells[:2] == ["class", "% of pixels"], cells
  table = {name: float(v) for name, v in zip(cells[2::2], cells[3::2])}
  assert list(table) == ["background"] + CLASSES
  for i, name in enumerate(["background"] + CLASSES):
    assert abs(table[name] - 100.0 * np.mean(label == i)) < 0.01, (name, table)
  assert 0 < table["background"] < 100  # bg_thresh 0.1 splits this model's scores
  captions = browser.find_element(by.CSS_SELECTOR, "#masks").text
  assert all(f"{c}: " in captions for c in CLASSES), captions
  assert len(browser.find_elements(by.CSS_SELECTOR, "#masks img")) >= len(CLASSES)

  # Nothing was fetched from anywhere but the app.
  fetched = browser.execute_script(
    "return performance.getEntriesByType('resource').map(e => e.name)"
  )
  assert fetched and all(u.startswith(url) or u.startswith("data:") for u in fetched), fetched

  shot = os.environ.get("TCL_APP_SCREENSHOT") or str(tmp_path / "app.png")
  assert browser.save_screenshot(shot)
  assert Image.open(shot).size[0] >= 1000


@needs_chromium
def test_bad_input_gets_a_message(server, browser, tmp_path):
  url, _, _ = server
  _open(browser, url)
  _fill(browser, None, "dog")
  _message(browser, "Upload an image first")

  (tmp_path / "notes.png").write_bytes(b"this is not a picture")
  _open(browser, url)
  _fill(browser, tmp_path / "notes.png", "dog")
  _message(browser, "The uploaded file is not an image that can be read")

  Image.fromarray(demo.draw_sample(W, H)).save(tmp_path / "photo.png")
  _open(browser, url)
  _fill(browser, tmp_path / "photo.png", " , ")
  _message(browser, "Type at least one class name")

  Image.fromarray(demo.draw_sample(2400, 1800)).save(tmp_path / "huge.png")
  _open(browser, url)
  _fill(browser, tmp_path / "huge.png", "dog")
  _message(browser, "downscaled the image from 2400x1800 to 1024x768")
  img, out = _output_image(browser, url)
  assert out.shape[:2] == (768 + demo.legend(["dog"], 1024).shape[0], 1024)
  status = browser.find_element(_by().CSS_SELECTOR, "#status").text
  assert "every pixel is background" in status  # this random model at the default 0.4


@pytest.mark.parametrize(
  "args, message",
  [
    (["--port=7860"], "error: the following arguments are required: --checkpoint"),
    (["--checkpoint=x", "--port=http"], "error: argument --port: invalid int value"),
    (["--checkpoint=x", "--port=70000"], "error: --port must be in 1..65535"),
    (["--checkpoint=/no/such/dir"], "error: cannot load checkpoint /no/such/dir: no checkpoint"),
  ],
)
def test_cli_usage_errors(args, message):
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.app", *args], capture_output=True, text=True, timeout=120
  )
  assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
