"""What a miniature workdir was made with, so that a command never mixes two runs' results.

`<workdir>/miniature_run.json` is written when a miniature run starts (before its data): the
settings that change what it computes (the whole config but for logging and checkpoint cadence,
the picture's size and total_steps; the CLIP file by content) and the wall time spent by earlier commands
that stopped before the end. A command whose settings differ (another `:seed=`, `:steps=`,
`--config.` value or CLIP file) is refused with one line; the same command resumes, and once the
run has finished (`miniature.json` written) it prints the stored figures without recomputing.

Standard library only: `python -m tcl_jax.main` answers both before TensorFlow and JAX load.
"""

import hashlib
import json
import os

RECORD = "miniature_run.json"
REPORT = "miniature.json"
MASKS = "miniature_masks.png"
# Fields that change neither the data nor the figures; total_steps is compared only with a
# finished run's (an unfinished run may be shortened or lengthened, as the training loop allows).
_IGNORED = (
  "total_steps",
  "log_every_steps",
  "checkpoint_every_steps",
  "image_log_every_steps",
  "image_log_num",
  "check_finite_every_step",
  "checkpoint",
  "distributed",
  "miniature.num_mask_images",
)
# Fields that configs/synthetic.py derives from `:steps=` (the warmup and UST phases).
_FROM_STEPS = ("optim.warmup_steps", "optim.ust_steps")
# What a workdir holds once any run (miniature or not) has started in it.
_RUN_FILES = ("checkpoints", "data", "config.json", "clip", "miniature_baseline.json", REPORT)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _flatten(node, prefix: str = "") -> dict:
  out = {}
  for key, value in node.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def settings(config, resolve=lambda p: p) -> dict:
  """The flat {field: value} a miniature run is made with (JSON values); the CLIP weights file is
  named by its sha256 (`resolve` maps the config's path to the file)."""
  flat = _flatten(json.loads(json.dumps(config.to_dict(), default=repr)))
  for field in list(flat):
    if any(field == f or field.startswith(f + ".") for f in _IGNORED):
      del flat[field]
  weights = flat.get("miniature.clip_weights")
  if weights and os.path.isfile(resolve(weights)):
    flat["miniature.clip_weights_sha256"] = _sha256(resolve(weights))
  return flat


def _read(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _show(value) -> str:
  return json.dumps(value) if isinstance(value, str) else repr(value)


def problem(config, workdir: str, resolve=lambda p: p) -> str | None:
  """Why `workdir` cannot take this miniature command (None: it is new, or made with the same
  settings)."""
  record = _read(os.path.join(workdir, RECORD))
  if record is None:
    if os.path.isdir(workdir) and any(os.path.exists(os.path.join(workdir, f)) for f in _RUN_FILES):
      return (
        f"--workdir={workdir} holds another run's files but no {RECORD} (what they were "
        "made with is unknown); use a new --workdir"
      )
    return None
  stored, now = record.get("settings", {}), settings(config, resolve)
  diff = [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
  report = _read(os.path.join(workdir, REPORT))
  if not diff and report is not None and report.get("tcl_steps") != config.total_steps:
    return (
      f"--workdir={workdir} holds a finished miniature run of {report.get('tcl_steps')} "
      f"TCL steps; this command asks for total_steps={config.total_steps}: use a new "
      "--workdir"
    )
  if not diff:
    return None
  if set(diff) <= set(_FROM_STEPS):  # said in the terms the command was given in: `:steps=`
    if report is not None and report.get("tcl_steps") != config.total_steps:
      steps = report.get("tcl_steps")
      return (
        f"--workdir={workdir} holds a finished miniature run of {steps} TCL steps "
        f"(:steps={steps}); this command asks for :steps={config.total_steps}: use a new "
        f"--workdir, or :steps={steps} to report it"
      )
    return (
      f"--workdir={workdir} holds a miniature run started with another :steps= (its "
      f"{', '.join(f'{k}={_show(stored.get(k))}' for k in diff)} follow from it); this command "
      f"asks for :steps={config.total_steps}: use a new --workdir, or that run's :steps= to "
      "resume it"
    )
  shown = ", ".join(f"{k}={_show(stored.get(k))}" for k in diff[:3])
  asked = ", ".join(f"{k}={_show(now.get(k))}" for k in diff[:3])
  more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
  return (
    f"--workdir={workdir} holds a miniature run made with {shown}{more}; this command has "
    f"{asked}: use a new --workdir (or the workdir's own settings, to resume or report it)"
  )


def start(config, workdir: str, resolve=lambda p: p) -> None:
  """Writes the record of a new run (a resumed run keeps its own)."""
  path = os.path.join(workdir, RECORD)
  if _read(path) is None:
    _write(path, {"settings": settings(config, resolve), "wall_s_spent": 0.0})


def _write(path: str, record: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)


def spent(workdir: str) -> float:
  """Wall seconds spent on this run by earlier commands (stopped, then resumed)."""
  record = _read(os.path.join(workdir, RECORD)) or {}
  return float(record.get("wall_s_spent", 0.0))


def add_spent(workdir: str, seconds: float) -> None:
  path = os.path.join(workdir, RECORD)
  record = _read(path)
  if record is not None:
    record["wall_s_spent"] = round(float(record.get("wall_s_spent", 0.0)) + seconds, 1)
    _write(path, record)


def finished(workdir: str) -> dict | None:
  """The stored report of a finished run (miniature.json), or None."""
  if _read(os.path.join(workdir, RECORD)) is None:
    return None
  return _read(os.path.join(workdir, REPORT))


def report_line(out: dict, steps: int, workdir: str, stored: bool = False) -> str:
  """The line the run prints: both mIoUs, the gain, each task, the wall time, the picture."""
  tasks = ", ".join(
    f"{t} {v['baseline_miou']:.2f} -> {v['tcl_miou']:.2f}" for t, v in out["per_task"].items()
  )
  kind = {"code": "CoDe"}.get(out.get("model_kind", "tcl"), "TCL")
  line = (
    f"miniature (seed {out['seed']}): zero-shot mIoU (%) on the shapes world, frozen-CLIP "
    f"baseline ({kind} at step 0) {out['baseline_miou']:.2f}, after {steps} {kind} steps "
    f"{out['tcl_miou']:.2f} ({out['tcl_miou'] - out['baseline_miou']:+.2f} points; "
    f"{tasks}); {out['wall_s']:.0f} s. Masks: {os.path.join(workdir, MASKS)} "
    f"(image | truth | baseline | {kind})"
  )
  if stored:
    line += (
      f". A finished run: these are the figures stored in "
      f"{os.path.join(workdir, REPORT)}, nothing was recomputed"
    )
  return line
