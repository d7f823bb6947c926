#!/usr/bin/env bash
# 1B Llama (TinyLlama shape) -> 4.1B, width x2, noisy 10 dB; 2 nodes x 8 GPUs: TP2 x DP8, ZeRO-1, bf16
#
# Check it on any CPU first (shapes, divisibility, memory per 80 GB GPU; no GPU needed):
#   .venv/bin/python launch/pretrain.py --config recipes/llama-1b-to-4b/train.json --dry-run --world-size 16
# SLURM (2 nodes):
#   SMALL=/models/small-hf DATA="/data/web" TOKENIZER=/data/tok.model SAVE=/ckpt/llama-1b-to-4b bash recipes/llama-1b-to-4b/submit.sh
# Without SLURM, on each node r of 2 (MASTER=first node's address):
#   NODE_RANK=r MASTER=host SMALL=... DATA=... TOKENIZER=... SAVE=... bash recipes/llama-1b-to-4b/submit.sh --torchrun
# Extra arguments go to launch/pretrain.py. --save and --load name the same directory, so resubmitting
# continues from the last complete checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${SMALL:?set SMALL to the small model (HF directory or small.pt)}" "${DATA:?set DATA to [weight] prefix ...}"
: "${TOKENIZER:?set TOKENIZER to the .model the data was prepared with}" "${SAVE:?set SAVE to the checkpoint directory}"
args=(--config recipes/llama-1b-to-4b/train.json --clone-from "$SMALL" --data-path $DATA --tokenizer-model "$TOKENIZER"
      --save "$SAVE" --load "$SAVE")
if [ "${1:-}" = "--torchrun" ]; then
  shift
  exec .venv/bin/torchrun --nnodes 2 --nproc_per_node 8 --node_rank "${NODE_RANK:?}" --rdzv_backend c10d \
    --rdzv_endpoint "${MASTER:?}:29500" --rdzv_id "llama-1b-to-4b" launch/pretrain.py --no-progress "${args[@]}" "$@"
fi
exec sbatch --nodes 2 --job-name llama-1b-to-4b launch/slurm/pretrain.sbatch "${args[@]}" "$@"
