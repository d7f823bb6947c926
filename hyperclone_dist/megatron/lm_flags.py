"""The Megatron-LM ``pretrain_gpt.py`` command line that continues pretraining one of our checkpoints:
the model flags derived from the checkpoint (lm_args.py), how to start from it, and nothing about the
run itself (data, batch, schedule), which the user adds after them (argparse keeps the last value).

    hyperclone megatron-lm-flags ckpt/                         # one flag per line, ready for an sbatch script
    hyperclone megatron-lm-flags ckpt/ --use-checkpoint-args   # the shape from the checkpoint's args

The checkpoint is given as ``--pretrained-checkpoint``, Megatron-LM's own warm start: while ``--load``
holds no checkpoint of the run yet, it loads the weights only (no optimizer or RNG state, iteration 0);
once the run has saved, a restart resumes from ``--load``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron import legacy, torch_dist
from hyperclone_dist.megatron.lm_args import (
    NULL_TOKENIZER,
    UNREAD_FROM_CHECKPOINT,
    TokenizerRef,
    command_line,
    model_arguments,
    require_expressible,
    tokenizer_ref,
)
from hyperclone_dist.megatron.load import LegacyCheckpoint


def stored_args(root: Path) -> tuple[argparse.Namespace, str]:
    """The ``args`` of the checkpoint at ``root`` and its format (legacy or torch_dist)."""
    if not root.is_dir():
        raise HypercloneError(f"{root}: no such checkpoint directory")
    it_dir = legacy.latest_dir(root)
    if (it_dir / "metadata.json").is_file():
        return torch_dist.read_args(it_dir), "torch_dist"
    return LegacyCheckpoint(root).args, "legacy"


def pretrain_flags(root: str | Path, use_checkpoint_args: bool = False) -> list[str]:
    """Megatron-LM flags that build the model of ``root`` exactly and start from its weights. With
    ``use_checkpoint_args``: ``--use-checkpoint-args`` and only the model flags Megatron-LM does not read
    from a checkpoint's args."""
    root = Path(root)
    args, fmt = stored_args(root)
    cfg = ModelConfig.from_dict(args.hyperclone_config)
    require_expressible(cfg)
    layout = Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                    vpp=args.virtual_pipeline_model_parallel_size,
                    vocab_divisible_by=args.make_vocab_size_divisible_by,
                    first_stage_layers=getattr(args, "decoder_first_pipeline_num_layers", None),
                    last_stage_layers=getattr(args, "decoder_last_pipeline_num_layers", None))
    dtype = args.params_dtype if isinstance(getattr(args, "params_dtype", None), torch.dtype) else torch.float32
    stored_tokenizer = getattr(args, "tokenizer_type", None)
    tokenizer = (TokenizerRef(stored_tokenizer, getattr(args, "tokenizer_model", None))
                 if stored_tokenizer and stored_tokenizer != NULL_TOKENIZER else tokenizer_ref(root))
    values = model_arguments(cfg, layout, dtype, fmt, tokenizer)
    values["padded_vocab_size"] = int(args.padded_vocab_size)  # the stored embedding's rows, whatever wrote it
    if tokenizer is None:  # the user names it (tokenizer_missing says so)
        values["tokenizer_type"] = values["tokenizer_model"] = None
    start = ["--pretrained-checkpoint", str(root.resolve())]
    if use_checkpoint_args:
        unread = {dest: values[dest] for dest in UNREAD_FROM_CHECKPOINT}  # (Megatron-LM's defaults differ)
        tokenizer_flags = {dest: values[dest] for dest in ("tokenizer_type", "tokenizer_model")}  # read only on request
        return ["--use-checkpoint-args", *command_line(unread), *command_line(tokenizer_flags), *start]
    return command_line(values) + start


def tokenizer_missing(flags: list[str]) -> bool:
    return "--tokenizer-type" not in flags


def format_flags(flags: list[str]) -> str:
    """One flag (with its value) per line, shell-quoted, continued with backslashes."""
    lines, k = [], 0
    while k < len(flags):
        takes_value = k + 1 < len(flags) and not flags[k + 1].startswith("--")
        lines.append(" ".join(shlex.quote(f) for f in flags[k:k + 1 + takes_value]))
        k += 1 + takes_value
    return " \\\n".join(lines)
