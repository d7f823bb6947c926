#!/usr/bin/env bash
# GPU readiness in one prepared run on one GPU, within 8 minutes: the built-in model grown x2 and its logits
# checked in float32 and bf16 (a); pretrain.py --clone-from in bf16 (b: first loss, falling loss, tokens/s,
# MFU) against a bare PyTorch loop over the same model (c: the tokens/s ratio); a ~1B model's MFU at
# sequence 2048 (d); the GPU recipe, shortened (e). Writes the GPU section of docs/benchmarks.md, prints it.
#
# Here, where the package index is reachable (wheels for the GPU machine's CPython 3.12, the corpus):
#   bash benchmarks/gpu/prepare_wheels.sh
#   bash benchmarks/gpu/check.sh --dry-run            # any CPU: wheels, carry size, every command checked
# On the GPU machine, carrying .cache/gpu-wheels and .cache/gpu-corpus with the working tree:
#   bash benchmarks/gpu/check.sh [--budget-s 480] [--copy-to DIR]
#
# The interpreter: $PYTHON, else .venv/bin/python (a bootstrapped GPU node), else python3 (a GPU image whose
# python3 holds a CUDA torch). Only the packages it lacks are installed, from the wheels, into a folder of
# their own (--site) put first on PYTHONPATH; the interpreter's environment is left as it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
started=$(date +%s)
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
command -v "$py" >/dev/null || { echo "check.sh: error: no Python interpreter $py" >&2; exit 2; }
exec "$py" benchmarks/gpu/check.py --started "$started" "$@"
