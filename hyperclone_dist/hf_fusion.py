"""How fused HF tensors (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) relate to canonical ones."""

from __future__ import annotations

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.families import Family


def _part_rows(cfg: ModelConfig, parts: tuple[str, ...]) -> list[int]:
    sizes = {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}
    return [sizes[p.split(".")[-2]] for p in parts]


def split_hf(family: Family, template: str, tensor: torch.Tensor, parts: tuple[str, ...],
             cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical tensors held by one HF tensor."""
    if template in family.transposed:
        tensor = tensor.t()
    if len(parts) == 1:
        return {parts[0]: tensor}
    if family.qkv_fusion == "per_head":  # [H, 3, head_dim, ...]: q, k, v rows interleaved per head
        per_head = tensor.reshape(cfg.num_heads, 3, cfg.head_dim, *tensor.shape[1:])
        return {p: per_head[:, j].reshape(-1, *tensor.shape[1:]) for j, p in enumerate(parts)}
    return dict(zip(parts, torch.split(tensor, _part_rows(cfg, parts), dim=0)))


def fuse_hf(family: Family, template: str, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Inverse of split_hf: one HF tensor from its canonical parts (in the family's part order)."""
    if len(tensors) == 1:
        fused = tensors[0]
    elif family.qkv_fusion == "per_head":
        rest = tensors[0].shape[1:]
        per_head = [t.reshape(cfg.num_heads, 1, cfg.head_dim, *rest) for t in tensors]
        fused = torch.cat(per_head, dim=1).reshape(-1, *rest)
    else:
        fused = torch.cat(tensors, dim=0)
    if template in family.transposed:
        fused = fused.t()
    return fused.contiguous()


def hf_shape(family: Family, template: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    rows = sum(s[0] for s in shapes)
    shape = (rows, *shapes[0][1:])
    if template in family.transposed:
        shape = tuple(reversed(shape))
    return shape
