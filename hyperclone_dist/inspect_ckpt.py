"""What a checkpoint holds: family, shape, parameter count, dtype."""

from __future__ import annotations

from pathlib import Path

from hyperclone_dist.checkpoint.reader import SourceCheckpoint
from hyperclone_dist.params import canonical_shapes, parameter_count


def describe(path: str | Path, tensors: bool = False) -> str:
    source = SourceCheckpoint(path)
    cfg = source.config
    lines = [
        f"path        {source.path} ({source.kind})",
        f"family      {cfg.family}",
        f"parameters  {parameter_count(cfg):,} ({source.nbytes / 2**20:.1f} MiB, {str(source.dtype).removeprefix('torch.')})",
        f"shape       layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads {cfg.num_heads} "
        f"(kv {cfg.num_kv_heads}, head_dim {cfg.head_dim}), ffn {cfg.ffn_hidden_size}"
        f"{' gated' if cfg.gated_mlp else ''}, vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}",
        f"blocks      {cfg.norm}, {cfg.position_embedding} positions, activation {cfg.activation}, "
        f"{'tied' if cfg.tie_word_embeddings else 'untied'} head"
        f"{', parallel residual' if cfg.parallel_residual else ''}{'' if cfg.pre_norm else ', post-LN'}",
    ]
    if tensors:
        for name, shape in canonical_shapes(cfg, with_head=not cfg.tie_word_embeddings).items():
            lines.append(f"  {name:<40} {list(shape)}")
    return "\n".join(lines)
