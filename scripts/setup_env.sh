#!/usr/bin/env bash
# Creates .venv with torch (the local CPU wheel, or an already-installed torch) and
# rdiag with its test extras. Idempotent: reruns only when setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.rdiag-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  if python3 -c "import torch" 2>/dev/null; then
    # Reuse the torch already installed (e.g. a CUDA build on a GPU machine).
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # A bare 'torch' requirement would download a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
# Extras that depend on torch (lightning, transformers) must never replace it (a CUDA
# build from PyPI on a CPU machine): pin it to the version installed above. The
# extras include no torchvision (transformers imports it when present).
TORCH=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
echo "torch==$TORCH" > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -e ".[test]"
touch "$STAMP"
