#!/usr/bin/env bash
# Set up hyperclone-dist from nothing: creates .venv/ at the repo root holding everything.
#   bash launch/bootstrap.sh
# Keeps a torch that is already installed (in .venv, or in the system Python, e.g. a CUDA build on
# a GPU node); otherwise installs the pinned CPU wheel. Re-running is cheap: it reinstalls only when
# pyproject.toml or configs/constraints.txt changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "bootstrap: error: Python >= 3.11 required, found $("$py" --version 2>&1)" >&2; exit 2; }

if [ ! -x .venv/bin/python ]; then
  if "$py" -c 'import torch' 2>/dev/null; then
    echo "bootstrap: using the system torch ($("$py" -c 'import torch; print(torch.__version__)'))"
    "$py" -m venv --system-site-packages .venv
  else
    "$py" -m venv .venv
  fi
fi

stamp=.venv/.hyperclone-installed
want="$(cat pyproject.toml configs/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

constraints=.venv/constraints.txt
if .venv/bin/python -c 'import torch' 2>/dev/null; then
  grep -v '^torch==' configs/constraints.txt > "$constraints"   # keep the torch that is there
else
  cp configs/constraints.txt "$constraints"
  .venv/bin/pip install -q -c "$constraints" torch
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q -c "$constraints" -e .
.venv/bin/python -c 'import torch, transformers, megatron.core, deepspeed, safetensors, sentencepiece' \
  || { echo "bootstrap: error: installation incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
