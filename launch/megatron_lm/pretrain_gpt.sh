#!/usr/bin/env bash
# Continue pretraining a converted checkpoint with upstream Megatron-LM's pretrain_gpt.py (tag
# core_v0.16.1, the tree matching our pinned megatron-core). The model flags come from the checkpoint
# (`hyperclone megatron-lm-flags`); everything after CKPT is passed to pretrain_gpt.py after them, so
# it adds the run's data and schedule and overrides any default below (argparse keeps the last value).
#
#   MEGATRON_LM=~/Megatron-LM bash launch/megatron_lm/pretrain_gpt.sh ckpt/ \
#       --data-path data/english_text_document --train-iters 20000 --lr 3e-4 --bf16
#   bash launch/megatron_lm/pretrain_gpt.sh ckpt/ --print-flags      # the flags, for your own sbatch
#
# The checkpoint is Megatron-LM's --pretrained-checkpoint: the first start loads its weights only (no
# optimizer or RNG state); the run saves to and resumes from SAVE (default: CKPT-megatron-lm).
# Multi-node: run this once per node with NNODES, NODE_RANK and MASTER_ADDR set (pretrain_gpt.sbatch
# does it under SLURM). A torch_dist checkpoint loads at any --tensor/--pipeline-model-parallel-size;
# a legacy one only at the layout it was written at.
# Environment: MEGATRON_LM (required unless --print-flags), PYTHON (the Python that runs Megatron-LM,
# default python3), GPUS_PER_NODE (default: the GPUs nvidia-smi lists), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (localhost), MASTER_PORT (6000), SAVE, HYPERCLONE (default: this repo's .venv/bin/hyperclone).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
usage="usage: [MEGATRON_LM=DIR] bash launch/megatron_lm/pretrain_gpt.sh CKPT [--print-flags] [pretrain_gpt.py flags]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
CKPT=$1
shift
print_only=0
passed=()
for arg in "$@"; do
  if [ "$arg" = "--print-flags" ]; then print_only=1; else passed+=("$arg"); fi
done

HYPERCLONE=${HYPERCLONE:-$repo/.venv/bin/hyperclone}
flags_text=$("$HYPERCLONE" megatron-lm-flags "$CKPT") || exit $?
if [ "$print_only" = 1 ]; then
  printf '%s\n' "$flags_text"
  exit 0
fi
eval "model_flags=($flags_text)"   # shell-quoted by megatron-lm-flags

[ -n "${MEGATRON_LM:-}" ] \
  || { echo "pretrain_gpt.sh: error: set MEGATRON_LM to a Megatron-LM checkout (tag core_v0.16.1)" >&2; exit 2; }
[ -f "$MEGATRON_LM/pretrain_gpt.py" ] \
  || { echo "pretrain_gpt.sh: error: $MEGATRON_LM has no pretrain_gpt.py (not a Megatron-LM checkout)" >&2; exit 2; }
SAVE=${SAVE:-${CKPT%/}-megatron-lm}
GPUS_PER_NODE=${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$GPUS_PER_NODE" -gt 0 ] || { echo "pretrain_gpt.sh: error: no GPU found; set GPUS_PER_NODE" >&2; exit 2; }

run_defaults=(  # a starting point; every one can be overridden after CKPT
  --micro-batch-size 1 --global-batch-size 256 --train-iters 1000
  --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 100
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --log-interval 10 --save-interval 500 --eval-interval 500 --eval-iters 10
  --save "$SAVE" --load "$SAVE" --tensorboard-dir "$SAVE/tensorboard"
)
exec "${PYTHON:-python3}" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-6000}" \
  "$MEGATRON_LM/pretrain_gpt.py" "${model_flags[@]}" "${run_defaults[@]}" "${passed[@]}"
