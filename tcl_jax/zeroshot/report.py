"""Zero-shot results as people read them: per-task tables, the summary table, results.json."""

import json
import os


def fmt_miou(v) -> str:
  return "  n/a" if v is None else f"{v:6.2f}"


def format_task_table(task: str, r: dict) -> str:
  names = list(r["per_class_iou"])
  width = max([len("class")] + [len(repr(n)) for n in names])
  lines = [f"{task}: per-class IoU (%)", f"  {'class':<{width}}  IoU"]
  for n, v in r["per_class_iou"].items():
    lines.append(f"  {n:<{width}}  {fmt_miou(v)}")
  lines.append(
    f"  {'mIoU':<{width}}  {fmt_miou(r['miou'])}   ({r['num_images']} images, "
    f"{r['num_skipped']} skipped)"
  )
  return "\n".join(lines)


def format_summary(results: dict) -> str:
  tasks = [k for k in results if k != "average"]
  width = max([len("average")] + [len(t) for t in tasks])
  lines = [f"{'task':<{width}}  mIoU (%)  images  skipped"]
  for t in tasks:
    r = results[t]
    lines.append(
      f"{t:<{width}}  {fmt_miou(r['miou']):>8}  {r['num_images']:6d}  {r['num_skipped']:7d}"
    )
  lines.append(f"{'average':<{width}}  {fmt_miou(results['average']):>8}")
  return "\n".join(lines)


def format_grid(grid: list) -> str:
  """One table of a method x protocol grid: [{"method", "protocol", "results"}, ...] -> a row per
  entry, a column per benchmark and the average (mIoU %)."""
  tasks = []
  for g in grid:
    tasks += [t for t in g["results"] if t != "average" and t not in tasks]
  cols = tasks + ["average"]
  mw = max([len("method")] + [len(g["method"]) for g in grid])
  pw = max([len("protocol")] + [len(g["protocol"]) for g in grid])
  widths = [max(7, len(c)) for c in cols]
  head = f"{'method':<{mw}}  {'protocol':<{pw}}  " + "  ".join(
    f"{c:>{w}}" for c, w in zip(cols, widths)
  )
  lines = ["mIoU (%)", head]
  for g in grid:
    r = g["results"]
    cells = [
      fmt_miou(r.get(c) if c == "average" else (r[c]["miou"] if c in r else None)).strip()
      for c in cols
    ]
    lines.append(
      f"{g['method']:<{mw}}  {g['protocol']:<{pw}}  "
      + "  ".join(f"{v:>{w}}" for v, w in zip(cells, widths))
    )
  return "\n".join(lines)


def write_results(results: dict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "results.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, allow_nan=False)
  os.replace(tmp, path)
  return path
