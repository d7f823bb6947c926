#!/usr/bin/env bash
# 7B Llama (Llama-2-7B shape) -> 26.5B, width x2; 8 nodes x 8 GPUs: TP8 x PP4 x DP2, ZeRO-1, bf16
#
# Check it on any CPU first (shapes, divisibility, memory per 80 GB GPU; no GPU needed):
#   .venv/bin/python launch/pretrain.py --config recipes/llama-7b-to-26b/train.json --dry-run --world-size 64
# SLURM (8 nodes):
#   SMALL=/models/small-hf DATA="/data/web" TOKENIZER=/data/tok.model SAVE=/ckpt/llama-7b-to-26b bash recipes/llama-7b-to-26b/submit.sh
# Without SLURM, on each node r of 8 (MASTER=first node's address):
#   NODE_RANK=r MASTER=host SMALL=... DATA=... TOKENIZER=... SAVE=... bash recipes/llama-7b-to-26b/submit.sh --torchrun
# Extra arguments go to launch/pretrain.py. --save and --load name the same directory, so resubmitting
# continues from the last complete checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${SMALL:?set SMALL to the small model (HF directory or small.pt)}" "${DATA:?set DATA to [weight] prefix ...}"
: "${TOKENIZER:?set TOKENIZER to the .model the data was prepared with}" "${SAVE:?set SAVE to the checkpoint directory}"
args=(--config recipes/llama-7b-to-26b/train.json --clone-from "$SMALL" --data-path $DATA --tokenizer-model "$TOKENIZER"
      --save "$SAVE" --load "$SAVE")
if [ "${1:-}" = "--torchrun" ]; then
  shift
  exec .venv/bin/torchrun --nnodes 8 --nproc_per_node 8 --node_rank "${NODE_RANK:?}" --rdzv_backend c10d \
    --rdzv_endpoint "${MASTER:?}:29500" --rdzv_id "llama-7b-to-26b" launch/pretrain.py --no-progress "${args[@]}" "$@"
fi
exec sbatch --nodes 8 --job-name llama-7b-to-26b launch/slurm/pretrain.sbatch "${args[@]}" "$@"
