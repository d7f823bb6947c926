"""Symmetry monitor for cloned runs: do the n copies of each hidden unit stay copies?

A HyperCloning clone of width factor n holds every hidden unit n times (copy-major: unit j of copy k is
row k * d_small + j). A symmetric clone trained without noise keeps the copies identical forever, so the
large model has only the small model's capacity; noise, or anything that breaks the tie, lets them
diverge. For the parameters the table marks as watched (params.py: the matrices that write into the hidden
stream, whose rows are hidden units complete on every TP rank, and the final norm), this compares row block
k with row block 0 for k = 1..n-1:

    cosine(k) = <B_k, B_0> / (|B_k| |B_0|),   rel_diff(k) = |B_k - B_0| / |B_0|

Dot products and norms are summed over the TP group (each rank holds a column slice), so the figures are
those of the whole matrix at any layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.mapping import chunk_rules


def _block_sums(weight: torch.Tensor, copies: int) -> torch.Tensor:
    """[copies - 1, 3]: (<B_k, B_0>, |B_k|^2, |B_0|^2) for row blocks k >= 1."""
    w = weight.detach().double()
    blocks = w.reshape(copies, w.shape[0] // copies, -1)
    first = blocks[0]
    rest = blocks[1:]
    dots = (rest * first).sum(dim=(1, 2))
    return torch.stack([dots, (rest * rest).sum(dim=(1, 2)), (first * first).sum().expand_as(dots)], dim=1)


def watched_names(cfg: ModelConfig, layout: Layout, pp_rank: int) -> list[set[str]]:
    """Per model chunk of this pipeline rank, the local names of the watched parameters."""
    return [{name for name, rules in chunk_rules(cfg, layout, pp_rank, chunk).items()
             if all(rule.watched for rule in rules)} for chunk in range(layout.chunks)]


@torch.no_grad()
def symmetry_stats(chunks: list, watched: list[set[str]], copies: int) -> dict[str, float] | None:
    """Collective over the whole job; every rank gets the same figures (None when copies == 1)."""
    from megatron.core import parallel_state as ps  # heavy: imported once a job runs

    if copies < 2:
        return None
    sums = []
    for chunk, names in zip(chunks, watched):
        for name, param in chunk.named_parameters():
            if name in names and param.shape[0] % copies == 0:
                sums.append(_block_sums(param, copies))
    if sums:
        stacked = torch.stack(sums)  # [params, copies - 1, 3], the same params on every rank of a TP group
        dist.all_reduce(stacked, group=ps.get_tensor_model_parallel_group())
        dot, norm_k, norm_0 = stacked.unbind(-1)
        cosine = dot / (norm_k.sqrt() * norm_0.sqrt()).clamp(min=1e-300)
        rel = (norm_k + norm_0 - 2 * dot).clamp(min=0).sqrt() / norm_0.sqrt().clamp(min=1e-300)
        local = torch.tensor([cosine.min().item(), -rel.max().item(), cosine.sum().item(), cosine.numel()],
                             dtype=torch.float64)
    else:  # a stage without watched parameters contributes nothing
        local = torch.tensor([float("inf"), float("inf"), 0.0, 0.0], dtype=torch.float64)
    extremes, totals = local[:2].clone(), local[2:].clone()
    dist.all_reduce(extremes, op=dist.ReduceOp.MIN)
    dist.all_reduce(totals)
    return {"symmetry/min_cosine": extremes[0].item(), "symmetry/max_rel_diff": -extremes[1].item(),
            "symmetry/mean_cosine": (totals[0] / totals[1].clamp(min=1)).item()}
