"""Megatron-LM's legacy checkpoint layout, fixed to one TP x PP layout:

    DIR/latest_checkpointed_iteration.txt
    DIR/iter_0000000/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   # {"model": ..., "args": ..., ...}

With virtual pipeline stages the model chunks are stored as "model0", "model1", ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hyperclone_dist.checkpoint.torch_load import torch_load
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.model import rotary_kwargs

CHECKPOINT_VERSION = 3.0
TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def rank_dir(root: Path, iteration: int, layout: Layout, tp_rank: int, pp_rank: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if layout.pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return iteration_dir(root, iteration) / name


def megatron_args(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, iteration: int = 0) -> argparse.Namespace:
    """The subset of Megatron-LM's arguments its loaders read back from a checkpoint, plus our own
    ModelConfig under ``hyperclone_config`` so the checkpoint can be exported without guessing."""
    rope = rotary_kwargs(cfg)
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_heads, kv_channels=cfg.head_dim,
        group_query_attention=cfg.num_kv_heads != cfg.num_heads, num_query_groups=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=cfg.max_position_embeddings,
        padded_vocab_size=layout.padded_vocab(cfg.vocab_size),
        vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=layout.vocab_divisible_by,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        decoder_first_pipeline_num_layers=layout.first_stage_layers,
        decoder_last_pipeline_num_layers=layout.last_stage_layers,
        normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm", norm_epsilon=cfg.norm_eps,
        swiglu=cfg.gated_mlp and cfg.activation == "silu",
        position_embedding_type="rope" if cfg.position_embedding == "rope" else "learned_absolute",
        rotary_percent=cfg.rotary_percent, rotary_base=cfg.rotary_base,
        use_rope_scaling=rope.get("rope_scaling", False), rope_scaling_factor=rope.get("rope_scaling_factor", 8.0),
        rotary_seq_len_interpolation_factor=rope.get("seq_len_interpolation_factor"),
        qk_layernorm=cfg.head_qk_norm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        add_bias_linear=cfg.attn_out_bias or cfg.mlp_bias, add_qkv_bias=cfg.qkv_bias,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        iteration=iteration, consumed_train_samples=0, consumed_valid_samples=0,
        ckpt_format="torch", transformer_impl="local" if layout.spec == "local" else "transformer_engine",
        hyperclone_config=cfg.to_dict(),
    )


def rank_payload(models: list[dict[str, torch.Tensor]], args: argparse.Namespace, iteration: int) -> dict:
    payload = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    if len(models) == 1:
        payload["model"] = models[0]
    else:
        payload.update({f"model{k}": sd for k, sd in enumerate(models)})
    return payload


def load_rank(path: Path) -> dict:
    """Read one rank's file without executing code: ``argparse.Namespace`` is the only class allowed."""
    with torch.serialization.safe_globals([argparse.Namespace, torch.float32.__class__]):
        return torch_load(path)
