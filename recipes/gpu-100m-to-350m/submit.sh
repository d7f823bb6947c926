#!/usr/bin/env bash
# ~100M Llama trained here, grown x2 to ~350M (bf16, sequence 1024), raced against a random init of the
# ~350M shape; writes its section of docs/results.md (speedup, MFU, date, GPU) and the curves.
#
# Check the large run's shape and memory on any CPU first:
#   .venv/bin/python launch/pretrain.py --config recipes/gpu-100m-to-350m/train.json --dry-run --world-size 1
# One node, every visible GPU (about an hour on one H100 at the defaults):
#   bash recipes/gpu-100m-to-350m/submit.sh [--steps 3000 --input /data/corpus.jsonl ...]
# SLURM, from the repository root:
#   sbatch --nodes 1 --gpus-per-node 8 recipes/gpu-100m-to-350m/submit.sh
# Finished steps are skipped on a rerun (the tokenizer, the small model, every arm with a 'done' file).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/../..}"
[ -x .venv/bin/python ] || bash launch/bootstrap.sh
exec .venv/bin/python recipes/gpu-100m-to-350m/run.py "$@"
