"""What a training run reports: mean metrics, memory, evaluation scalars, mask images, and the
summary table printed at the end."""

import jax
import numpy as np

AVERAGE_MIOU = "eval/average_miou_percent"  # TensorBoard tag; also the best-checkpoint metric


def mask_overlay_grid(images, masks, mean, std, threshold: float | None = None) -> np.ndarray:
  """[3*H, n*W, 3] uint8 grid: images; soft positive masks; image * mask.

  The original's wandb grid thresholds the masks at 0.5 (`threshold=0.5`); the default shows the
  soft values, which stay informative early in training when few pixels pass 0.5.
  """
  images = np.clip(np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean), 0, 1)
  n, h, w, _ = images.shape
  masks = np.asarray(masks, np.float32)
  # Nearest upsampling of the [n, h', w'] masks to the image size.
  ys = (np.arange(h) * masks.shape[1]) // h
  xs = (np.arange(w) * masks.shape[2]) // w
  m = masks[:, ys][:, :, xs]
  if threshold is not None:
    m = (m > threshold).astype(np.float32)
  m = np.clip(m, 0, 1)[..., None].repeat(3, -1)
  rows = [images, m, images * m]
  grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
  return (grid * 255).round().astype(np.uint8)


def mean_metrics(history: list[dict]) -> dict[str, float]:
  host = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def peak_memory_metrics() -> dict[str, float]:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if not stats or "peak_bytes_in_use" not in stats:
    return {}
  return {"peak_memory_gib": stats["peak_bytes_in_use"] / 2**30}


def format_run_summary(
  workdir: str,
  first_step: int,
  last_step: int,
  wall_s: float,
  history: list[dict],
  evals: list[dict],
  saved: list[int],
) -> str:
  """The table printed at the end of a run: steps, wall time, the last logged losses, the last
  mIoU per task (%), the checkpoints written."""
  rows = [
    ("workdir", workdir),
    ("steps", f"{first_step} -> {last_step} ({last_step - first_step} in this run)"),
    ("wall time", f"{wall_s:.1f} s"),
  ]
  train_logs = [h for h in history if "loss" in h]
  if train_logs:
    last = train_logs[-1]
    for k in ["loss"] + sorted(k for k in last if k.endswith("_loss")):
      rows.append((f"train/{k}", f"{last[k]:.4f}  (step {last['step']})"))
  if evals:
    last = evals[-1]
    for k, v in last.items():
      if k != "step":
        rows.append((k, f"{v:.2f}  (step {last['step']})"))
  rows.append(
    (
      "checkpoints written",
      ", ".join(map(str, saved)) + f"  (in {workdir}/checkpoints)" if saved else "none",
    )
  )
  width = max(len(k) for k, _ in rows)
  return "\n".join(["Run summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def eval_scalars(results: dict) -> dict[str, float]:
  """{"eval/<task>/miou_percent", "eval/average_miou_percent"} from evaluate_tasks' result (None
  -> skipped); the unit is in the name because TensorBoard shows nothing else."""
  out = {}
  for task, r in results.items():
    if task == "average":
      if r is not None:
        out[AVERAGE_MIOU] = float(r)
    elif isinstance(r, dict) and r.get("miou") is not None:
      out[f"eval/{task}/miou_percent"] = float(r["miou"])
  return out
