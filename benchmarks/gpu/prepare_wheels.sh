#!/usr/bin/env bash
# What the GPU check needs on a machine that reaches no package index, made here into ignored folders that
# travel with the working tree: the wheels of the packages a GPU image lacks (megatron-core, DeepSpeed and
# what they need besides torch and numpy: benchmarks/gpu/wheels.py) and the embedded corpus tokenized for
# the check's 16384-piece vocabulary (CPU work the GPU machine then skips).
#   bash benchmarks/gpu/prepare_wheels.sh [--python-version 3.12] [--wheels .cache/gpu-wheels] [--corpus .cache/gpu-corpus]
#
# Target: CPython 3.12 on manylinux x86_64, the interpreter of the GPU image this was written for (its
# python3 holds a CUDA build of torch; check.sh --dry-run checks the folder against the target). Versions
# are this checkout's .venv's, the set the CPU tests run. torch is never downloaded: a wheel of it is
# 0.5-0.9 GB, far over the 64 MiB that travel to the GPU machine, and the image has its own CUDA build. DeepSpeed has
# no wheel on PyPI: it is built here from its source archive into a pure-Python wheel (DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
pyver=3.12 wheels=.cache/gpu-wheels corpus=.cache/gpu-corpus
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver="${2:?--python-version needs a value}"; shift 2 ;;
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    --corpus) corpus="${2:?--corpus needs a folder}"; shift 2 ;;
    *) echo "prepare_wheels.sh: error: unknown argument $1" >&2; exit 2 ;;
  esac
done
py=.venv/bin/python
[ -x "$py" ] || { echo "prepare_wheels.sh: error: no .venv here (bash launch/bootstrap.sh first)" >&2; exit 2; }
for dir in "$wheels" "$corpus"; do  # a tracked copy would travel twice and land in commits
  git check-ignore -q "$dir/x" || { echo "prepare_wheels.sh: error: $dir is not ignored by git" >&2; exit 2; }
done

platforms=()
for n in $(seq 39 -1 17); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done  # pip matches N exactly
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
staging="$wheels.partial"
rm -rf "$staging" && mkdir -p "$staging"
mapfile -t binary < <("$py" benchmarks/gpu/wheels.py list --binary)
mapfile -t built < <("$py" benchmarks/gpu/wheels.py list --built-here)
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$staging" "${binary[@]}"
DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$staging" "${built[@]}"
"$py" benchmarks/gpu/wheels.py check --wheels "$staging" --python-version "$pyver"
rm -rf "$wheels" && mv "$staging" "$wheels"   # a folder is either complete or absent

"$py" benchmarks/gpu/prepare_inputs.py --model-config configs/models/llama-100m.json --cache "$corpus"
echo "prepared: $wheels ($(du -sh "$wheels" | cut -f1)), $corpus ($(du -sh "$corpus" | cut -f1)); next: bash benchmarks/gpu/check.sh --dry-run"
