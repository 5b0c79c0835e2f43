#!/usr/bin/env bash
# The GPU benchmark in one script, ordered by value and fitted into one 10-minute device call:
#  1. bf16 training step at the recipe's 64 images/GPU, and the original PyTorch TCL's step in fp16
#     autocast at the same batch on the same GPU (images/s, ratio from this one run);
#  2. evaluation: the zero-shot protocol per image (VOC-sized synthetic images, 2 windows each,
#     PAMR, KP) through tcl_jax's engine and through the original's own path (mmseg's
#     slide_inference, one window per encode_decode, float32) on the same GPU and images: images/s
#     of both and the ratio; and eval windows/s with and without PAMR;
#  3. not timed, run side by side: parity with the original (the shared fixture: one step + the
#     12-step trajectory) on the GPU in float32 and bfloat16, and the attention-kernel tests;
#  4. the largest per-device batch that fits, no remat (images/s, MFU, memory);
#  5. the largest batch with remat.
#
#   bench/gpu.sh --prepare     # here, in the repo root, with ../shared beside it: fills bench/.cache
#   bench/gpu.sh               # on the GPU machine (repo root): writes $OUT (default bench/out)
#
# --prepare puts a plain copy of the original (kakaobrain/tcl @ bc2b551, from the git dir
# TCL_GIT_DIR), the parity fixture (../shared/fixtures/tcl_tiny, ~36 MB) and wheels of what a bare
# GPU image lacks for these steps (pytest, ml_collections) under bench/.cache, which .gitignore
# keeps out of the repo. The GPU run then needs the image's jax (CUDA), flax, optax, orbax, numpy,
# torch + einops for the original, and for step 2 OpenCV, Pillow, tqdm and tokenizers (the image
# has them; bench skips that part with a "# eval per image skipped" line where it does not): no
# TensorFlow, clu or data. With the device tool:
# carry=["bench/.cache"], timeout_s 600; each step gets at most what is left of DEADLINE_S (570 s
# from the start, set-up included).
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE=bench/.cache
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  mkdir -p "$CACHE/wheels" "$CACHE/tcl"
  : "${TCL_GIT_DIR:?set TCL_GIT_DIR to a git dir of kakaobrain/tcl (e.g. a fetched snapshot)}"
  git --git-dir="$TCL_GIT_DIR" archive bc2b551 | tar -x -C "$CACHE/tcl"
  FIXTURE=${FIXTURE:-../shared/fixtures/tcl_tiny}
  mkdir -p "$CACHE/fixture"
  cp "$FIXTURE"/{README.md,fixture.json,fixture.npz,tcl_reference.pth,trajectory.json,trajectory.npz} "$CACHE/fixture/"
  "$PY" -m pip download -q --no-deps -d "$CACHE/wheels" pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
    packaging==26.4 ml_collections==1.1.0
  du -sh "$CACHE"
  exit 0
fi

t0=$SECONDS  # the deadline counts the set-up below too: the whole call stays under 600 s
DEADLINE_S=${DEADLINE_S:-570}
OUT=${OUT:-bench/out}
LOGS=$(mktemp -d)  # per-step logs; only JSON and summary.md go to $OUT (the device tool returns 8 files)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  # the batch search predicts against this limit
export TF_CPP_MIN_LOG_LEVEL=2
[[ -d "$CACHE/tcl/models/tcl" && -f "$CACHE/fixture/trajectory.npz" ]] || { echo "gpu.sh: $CACHE/tcl missing; run bench/gpu.sh --prepare first" >&2; exit 2; }
# pytest and ml_collections (the parity replay reads configs/) if the image lacks them
"$PY" -c "import pytest, ml_collections" 2>/dev/null || "$PY" -m pip install -q --no-index \
  --find-links "$CACHE/wheels" pytest ml_collections

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 
"$PY" -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" 

step() { echo "== [$((SECONDS - t0)) s] $*"; }
# limit N: N seconds, or what is left before the deadline if less
limit() { local left=$((DEADLINE_S - (SECONDS - t0))); echo $(( $1 < left ? $1 : (left > 1 ? left : 1) )); }

step "1. tcl_jax bf16 vs the original fp16 autocast, 64 images/GPU (the recipe's)"
timeout "$(limit 200)" "$PY" -m tcl_jax.bench --dtype bfloat16 --batch 64 --steps 10 --eval-windows 0 --eval-images 0 \
  --torch-ref "$CACHE/tcl" --json "$OUT/bench_b64.json" 2>&1 | grep -v Warning

step "2. eval per image, tcl_jax vs the original (same images, same GPU), and eval windows/s"
timeout "$(limit 180)" "$PY" -m tcl_jax.bench --no-train --eval-images 32 --eval-windows 16 \
  --torch-ref "$CACHE/tcl" --json "$OUT/eval.json" 2>&1 | grep -v Warning

step "3. not timed, in parallel: parity with the original (float32, bfloat16) and the attention tests"
# XLA_PYTHON_CLIENT_PREALLOCATE=false: three processes share the GPU.
for dtype in float32 bfloat16; do
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$(limit 150)" "$PY" -m tcl_jax.tools.parity \
    "$CACHE/fixture" --dtype "$dtype" --json "$OUT/parity_$dtype.json" > "$LOGS/parity_$dtype.txt" 2>&1 &
done
# (-k "not pod": the TPU-launcher tests need TensorFlow, which the image lacks)
XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda timeout "$(limit 150)" "$PY" -m pytest -q \
  -p no:cacheprovider tests/test_accel.py -k "not pod" > "$LOGS/test_accel.txt" 2>&1 &
wait
for dtype in float32 bfloat16; do
  echo "-- parity $dtype"; grep -v " yes$" "$LOGS/parity_$dtype.txt" | grep -v Warning | tail -12
done
echo "-- attention tests"; tail -25 "$LOGS/test_accel.txt"

step "4. tcl_jax bf16, largest per-device batch, no remat"
timeout "$(limit 120)" "$PY" -m tcl_jax.bench --dtype bfloat16 --max-batch --steps 5 --eval-windows 0 --eval-images 0 \
  --json "$OUT/jax_bf16_max.json" 2>&1

step "5. tcl_jax bf16, largest per-device batch, remat"
timeout "$(limit 120)" "$PY" -m tcl_jax.bench --dtype bfloat16 --max-batch --remat --steps 5 \
  --eval-windows 0 --eval-images 0 --json "$OUT/jax_bf16_max_remat.json" 2>&1

step "summary"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, os, sys
out = sys.argv[1]
def load(name, last_line=False):
  p = os.path.join(out, name)
  if not os.path.exists(p) or not os.path.getsize(p):
    return None
  text = open(p).read()
  return json.loads(text.strip().splitlines()[-1]) if last_line else json.loads(text)
rows = [r for f in ("bench_b64.json", "jax_bf16_max.json", "jax_bf16_max_remat.json", "eval.json")
        for r in (load(f) or [])]
pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
gib = lambda v: "-" if v is None else f"{v:.1f}"
print("| run | batch/GPU | images/s | s/step | MFU | peak GiB | compile s |")
print("|---|---|---|---|---|---|---|")
for r in rows:
  if r.get("what") == "train_step":
    print(f"| tcl_jax bf16{', remat' if r['remat'] else ''} | {r['per_device_batch']} | "
          f"{r['images_per_s']:.1f} | {r['step_s']:.3f} | {pct(r['mfu'])} | "
          f"{gib(r['peak_memory_gib'])} | {r['compile_s']:.0f} |")
  elif r.get("impl") == "pytorch original" and r.get("what") != "eval_image":
    print(f"| original, {r['precision']} | {r['batch']} | {r['images_per_s']:.1f} | "
          f"{r['step_s']:.3f} | - | {gib(r['peak_memory_gib'])} | - |")
for r in rows:
  if "ratio_vs_original" in r and r.get("what") == "train_step":
    print(f"tcl_jax / original images/s at {r['per_device_batch']}/GPU: "
          f"{r['ratio_vs_original']:.2f}x (both measured in this run)")
  if r.get("what") == "eval_windows":
    print(f"eval: {r['windows']} windows of 448², PAMR {'on' if r['pamr'] else 'off'}: "
          f"{r['windows_per_s']:.1f} windows/s")
  if r.get("what") == "eval_image":
    who = "tcl_jax" if r["impl"] == "tcl_jax" else f"original ({r['precision']})"
    print(f"eval per image, {who}: {r['images']} images, {r['windows']} windows: "
          f"{r['images_per_s']:.2f} images/s, {r['windows_per_s']:.2f} windows/s"
          + (f"; tcl_jax / original = {r['ratio_vs_original']:.2f}x (this run)"
             if "ratio_vs_original" in r else ""))
for dtype in ("float32", "bfloat16"):
  p = load(f"parity_{dtype}.json")
  if p:
    res = p["results"]
    bad = [q["name"] for q in res if not q["ok"]]
    print(f"parity {dtype} on the GPU: {len(res) - len(bad)}/{len(res)} within tolerance"
          + (f"; out: {', '.join(bad[:8])}" if bad else ""))
EOF
step "done"
