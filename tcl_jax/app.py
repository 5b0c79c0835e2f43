"""Web demo (Gradio), like the original's Hugging Face Space: upload a photo, name the classes.

  python -m tcl_jax.app --checkpoint ckpt/tcl [--clip ViT-B-16.pt] [--host 127.0.0.1 --port 7860]

`--checkpoint`: a converted directory, a training workdir, or a PyTorch TCL file (`--clip` completes
a minimal release tcl.pth). Segmentation is tcl_jax.demo's path (the evaluation pipeline). The app
runs offline: no analytics, no share link, no version check, fonts served locally. Uploads larger
than MAX_SIDE on the long side are downscaled (the page says so); the first request compiles.
"""

import errno
import os
import socket
import sys
import time

# Before gradio is imported: no telemetry, no version check against the internet.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_SIDE = 1024
TITLE = "TCL zero-shot segmentation (tcl_jax)"


def _readable_or_message(decode):
  """Gradio decodes an upload (PIL) before the handler runs; a file that is not an image would end
  in a generic error there, so the decoder's failure becomes a message in the page."""
  import gradio as gr

  def preprocess(payload):
    try:
      return decode(payload)
    except Exception as e:  # whatever PIL raises: not an image, truncated, decompression bomb
      raise gr.Error(
        f"The uploaded file is not an image that can be read ({type(e).__name__}).",
        print_exception=False,
      ) from None

  return preprocess


def method_choices(segmenter) -> list:
  """The app's method menu: the checkpoint's own model, TCL's masks when it is a TCL, and every
  training-free method (tcl_jax.kinds.METHODS)."""
  from tcl_jax import kinds
  from tcl_jax.models import tcl as tcl_lib

  own = ["own"] + (["tcl"] if type(segmenter.cfg) is tcl_lib.TCLConfig else [])
  return own + list(kinds.METHODS)


def build_app(segmenter):
  """The gr.Blocks page around a demo.Segmenter."""
  import gradio as gr
  import numpy as np

  from tcl_jax import demo

  def run(image, classes_text, bg_thresh, pamr, method="own"):
    if image is None:
      raise gr.Error("Upload an image first (or pick an example below).", print_exception=False)
    classes = demo.parse_classes(classes_text)
    if not classes:
      raise gr.Error(
        "Type at least one class name, comma-separated (e.g. dog, grass, sky).",
        print_exception=False,
      )
    again = demo.repeated_classes(classes_text)
    if again:
      gr.Warning(f"Each class is kept once: dropped the repeat {', '.join(again)}.")
    image, note = demo.fit_image(np.asarray(image, np.uint8), MAX_SIDE)
    if note:
      gr.Warning(note)
    start = time.perf_counter()
    try:
      seg = segmenter(
        image, classes, pamr=bool(pamr), bg_thresh=float(bg_thresh), method=str(method)
      )
    except ValueError as e:
      raise gr.Error(str(e), print_exception=False) from None
    took = time.perf_counter() - start
    table = [[name, round(v, 2)] for name, v in seg.shares().items()]
    status = " ".join(n + "." for n in (note, seg.note()) if n)
    status += f" Segmented {image.shape[1]}x{image.shape[0]} in {took:.1f} s."
    return (
      demo.overlay_with_legend(image, seg),
      demo.class_mask_images(image, seg),
      table,
      status.strip(),
    )

  with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
    gr.Markdown(
      f"## {TITLE}\nZero-shot segmentation with any class names: TCL (Cha et al., "
      f"CVPR 2023) in JAX. Pixels whose best class score is below the background "
      f"threshold are background."
    )
    with gr.Row():
      with gr.Column():
        image = gr.Image(
          label="Image", type="numpy", image_mode="RGB", sources=["upload"], elem_id="image"
        )
        image.preprocess = _readable_or_message(image.preprocess)
        classes = gr.Textbox(
          label="Class names (comma-separated)", elem_id="classes", placeholder="dog, grass, sky"
        )
        bg = gr.Slider(
          0.0, 1.0, value=0.4, step=0.01, label="Background threshold", elem_id="bg_thresh"
        )
        pamr = gr.Checkbox(value=True, label="PAMR refinement", elem_id="pamr")
        method = gr.Dropdown(
          choices=method_choices(segmenter),
          value="own",
          label="Method (own: the checkpoint's model; the others: training-free, on its CLIP)",
          elem_id="method",
        )
        button = gr.Button("Segment", variant="primary", elem_id="run")
        gr.Examples(
          [[demo.SAMPLE_IMAGE, demo.SAMPLE_CLASSES]], inputs=[image, classes], cache_examples=False
        )
      with gr.Column():
        status = gr.Markdown(elem_id="status")
        overlay = gr.Image(
          label="Segmentation", type="numpy", format="png", interactive=False, elem_id="overlay"
        )
        table = gr.Dataframe(headers=["class", "% of pixels"], interactive=False, elem_id="shares")
        masks = gr.Gallery(label="Per-class masks", columns=3, format="png", elem_id="masks")
    button.click(run, [image, classes, bg, pamr, method], [overlay, masks, table, status])
  return app


def address_problem(host: str, port: int) -> str | None:
  """Why the app cannot listen on host:port (None: it can), naming the flag to change."""
  try:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
  except (socket.gaierror, UnicodeError) as e:
    return (
      f"--host {host}: not a name or address this machine can resolve "
      f"({getattr(e, 'strerror', None) or e}); use 127.0.0.1 (this machine only) or "
      "0.0.0.0 (every interface)"
    )
  with socket.socket(family, kind, proto) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
    try:
      s.bind(addr)
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        return f"--port {port}: already in use on {host}; pick a free port with --port"
      if e.errno == errno.EADDRNOTAVAIL:
        return (
          f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1, "
          "0.0.0.0 or one of this machine's own addresses"
        )
      if e.errno == errno.EACCES:
        return (
          f"--port {port}: not allowed ({e.strerror}; ports below 1024 need privileges); "
          "pick another with --port"
        )
      return f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
  return None


def gradio_missing() -> str | None:
  """Why Gradio cannot be imported (None: it can): it comes with the [demo] extra only."""
  fix = 'pip install "tcl_jax[demo]"'
  try:
    import gradio  # noqa: F401  pylint: disable=unused-import
  except ImportError as e:
    if getattr(e, "name", None) == "gradio":
      return f"the web app needs Gradio, which the demo extra installs: {fix}"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"Gradio is installed but cannot be imported ({first}); reinstall it: {fix}"
  return None


def main(argv=None):
  from tcl_jax import demo

  ap = demo.ArgumentParser(prog="python -m tcl_jax.app", description=__doc__.split("\n")[0])
  ap.add_argument(
    "--checkpoint", required=True, help="converted directory, training workdir, or PyTorch TCL file"
  )
  ap.add_argument("--clip", default=None, help="OpenAI ViT-B-16.pt, for a minimal release tcl.pth")
  ap.add_argument("--host", default="127.0.0.1")
  ap.add_argument("--port", type=int, default=7860)
  args = ap.parse_args(argv)
  if not 0 < args.port < 65536:
    ap.error(f"--port must be in 1..65535, got {args.port}")
  problem = gradio_missing() or address_problem(args.host, args.port)  # before the model loads
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  try:
    cfg, params = demo.load_model(args.checkpoint, args.clip)
  except (ValueError, OSError) as e:
    print(f"error: cannot load checkpoint {args.checkpoint}: {e}", file=sys.stderr)
    return 2
  app = build_app(demo.Segmenter(params, cfg))
  try:
    # quiet: Gradio's own start-up lines advise share=True and GRADIO_SERVER_PORT, which do not
    # apply here; the URL is printed below instead.
    app.launch(
      server_name=args.host,
      server_port=args.port,
      share=False,
      inbrowser=False,
      ssr_mode=False,
      mcp_server=False,
      pwa=False,
      max_file_size="50mb",
      footer_links=[],
      quiet=True,
      prevent_thread_lock=True,
    )
  except OSError as e:  # taken between the check above and the launch
    problem = address_problem(args.host, args.port)
    print(f"error: {problem or f'cannot serve on {args.host}:{args.port}: {e}'}", file=sys.stderr)
    return 1
  print(f"Serving on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
  try:
    app.block_thread()
  except KeyboardInterrupt:
    pass
  return 0


if __name__ == "__main__":
  sys.exit(main())
