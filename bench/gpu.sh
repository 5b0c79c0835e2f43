#!/usr/bin/env bash
# The GPU benchmark in one script: bf16 training step at the largest per-device batch that fits,
# with and without remat (images/s, MFU, memory), eval windows/s with and without PAMR, and the
# original PyTorch TCL's training step in fp16 autocast on the same GPU (images/s), plus the
# attention-kernel tests on the GPU. Figures and ratios all come from this one run.
#
#   bench/gpu.sh --prepare     # on a machine with internet, in the repo root: fills bench/.cache
#   bench/gpu.sh               # on the GPU machine (repo root): writes $OUT (default bench/out)
#
# --prepare puts a plain copy of the original (kakaobrain/tcl @ bc2b551, from the git dir
# TCL_GIT_DIR) and wheels of what a bare GPU image may lack for these steps
# (pytest) under bench/.cache, which .gitignore keeps out of the repo. The GPU run then needs the
# image's jax (CUDA), flax, optax, numpy, and torch + einops for the original: no TensorFlow, clu
# or data. With the device tool: carry=["bench/.cache"], timeout 600 s; it budgets ~8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE=bench/.cache
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  mkdir -p "$CACHE/wheels" "$CACHE/tcl"
  : "${TCL_GIT_DIR:?set TCL_GIT_DIR to a git dir of kakaobrain/tcl (e.g. a fetched snapshot)}"
  git --git-dir="$TCL_GIT_DIR" archive bc2b551 | tar -x -C "$CACHE/tcl"
  "$PY" -m pip download -q --no-deps -d "$CACHE/wheels" pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4
  du -sh "$CACHE"
  exit 0
fi

OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  # the batch search predicts against this limit
export TF_CPP_MIN_LOG_LEVEL=2
[[ -d "$CACHE/tcl/models/tcl" ]] || { echo "gpu.sh: $CACHE/tcl missing; run bench/gpu.sh --prepare first" >&2; exit 2; }
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links "$CACHE/wheels" pytest

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

t0=$SECONDS
step() { echo "== [$((SECONDS - t0)) s] $*"; }

step "attention kernels: cuDNN vs XLA on the GPU"
# (-k "not pod": the TPU-launcher tests need ml_collections/TensorFlow, which the image lacks)
JAX_PLATFORMS=cuda timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_accel.py -k "not pod" 2>&1 | tail -15 | tee "$OUT/test_accel.txt"

step "tcl_jax bf16, largest batch, no remat, + eval"
timeout 200 "$PY" -m tcl_jax.bench --dtype bfloat16 --max-batch --steps 10 --eval-windows 16 \
  --json "$OUT/jax_bf16.json" 2>&1 | tee "$OUT/jax_bf16.txt"

step "tcl_jax bf16, largest batch, remat"
timeout 150 "$PY" -m tcl_jax.bench --dtype bfloat16 --max-batch --remat --steps 10 --eval-windows 0 \
  --json "$OUT/jax_bf16_remat.json" 2>&1 | tee "$OUT/jax_bf16_remat.txt"

# The original at our no-remat batch; halved (at most twice) while it runs out of memory.
B=$("$PY" -c "import json; print(json.load(open('$OUT/jax_bf16.json'))[0]['per_device_batch'])" 2>/dev/null || echo 64)
for try in 1 2 3; do
  step "original PyTorch TCL, fp16 autocast, batch $B"
  if timeout 100 "$PY" -m tcl_jax.bench_torch --ref-repo "$CACHE/tcl" --batch "$B" --steps 10 \
       > "$OUT/torch_fp16.json" 2> "$OUT/torch_fp16.err"; then
    cat "$OUT/torch_fp16.json"; break
  fi
  tail -5 "$OUT/torch_fp16.err"
  grep -q "out of device memory" "$OUT/torch_fp16.err" || break
  B=$((B / 2))
done

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
rows = (load("jax_bf16.json") or []) + (load("jax_bf16_remat.json") or [])
train_rows = [r for r in rows if r["what"] == "train_step"]
orig = load("torch_fp16.json", last_line=True)
pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
gib = lambda v: "-" if v is None else f"{v:.1f}"
print("| run | batch/GPU | images/s | s/step | MFU | peak GiB | compile s |")
print("|---|---|---|---|---|---|---|")
for r in train_rows:
  print(f"| tcl_jax bf16{', remat' if r['remat'] else ''} | {r['per_device_batch']} | "
        f"{r['images_per_s']:.1f} | {r['step_s']:.3f} | {pct(r['mfu'])} | "
        f"{gib(r['peak_memory_gib'])} | {r['compile_s']:.0f} |")
if orig:
  print(f"| original, fp16 autocast | {orig['batch']} | {orig['images_per_s']:.1f} | "
        f"{orig['step_s']:.3f} | - | {gib(orig['peak_memory_gib'])} | - |")
  for r in train_rows:
    print(f"tcl_jax{' remat' if r['remat'] else ''} / original images/s: "
          f"{r['images_per_s'] / orig['images_per_s']:.2f}x (both measured in this run)")
for r in rows:
  if r["what"] == "eval_windows":
    print(f"eval: {r['windows']} windows of 448², PAMR {'on' if r['pamr'] else 'off'}: "
          f"{r['windows_per_s']:.1f} windows/s")
EOF
step "done"
