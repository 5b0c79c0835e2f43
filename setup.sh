#!/usr/bin/env bash
# Makes .venv (Python >= 3.12, which current jax needs) with the pinned CPU requirements and this
# package in editable mode. Used by the README's quick start and by .ci/run, so the two cannot
# drift apart. Re-running it reuses .venv and only installs what changed.
# `./setup.sh --print-python` prints the interpreter it would make .venv with.
set -euo pipefail
cd "$(dirname "$0")"

# The first interpreter that really runs and is >= 3.12. A name on PATH is not enough: pyenv
# installs shims for every version it knows, which exit 127 unless that version is selected.
find_python() {
  local c
  for c in python3.13 python3.12 python3 \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 \
           /usr/bin/python3.13 /usr/bin/python3.12 /usr/local/bin/python3.13 /usr/local/bin/python3.12; do
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      command -v "$c"; return
    fi
  done
  echo "setup.sh: no Python >= 3.12 found (tried python3.13, python3.12, python3, pyenv versions," \
       "/usr/bin, /usr/local/bin); install one, e.g. 'pyenv install 3.12'" >&2
  exit 1
}

if [ "${1:-}" = "--print-python" ]; then  # which interpreter a new .venv would use
  find_python; exit
fi

if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
  if [ -e .venv ]; then
    echo "setup.sh: .venv exists but holds no working Python >= 3.12; remove it and run again" >&2
    exit 1
  fi
  PY=$(find_python)
  echo "setup.sh: creating .venv with $PY ($("$PY" --version 2>&1))"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "setup.sh: ready ($(.venv/bin/python --version)); run commands with .venv/bin/python"
