"""μP for continued pretraining of a wider model (Yang et al. 2022; warmstarting: Mallik et al. 2024).

With Adam, μP scales the learning rate of every hidden matrix (fan-in grows with width) by
base_width / width, keeps it for vectors and the input embedding, and scales the output layer's LR by the
same ratio; an LR tuned on the small model then carries over. Which parameter is which is the μP kind
column of the parameter table (params.py). The multipliers are per parameter group, so the LR schedule
still applies to all of them.
"""

from __future__ import annotations

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.mapping import chunk_rules

SCALED_KINDS = ("hidden", "output")  # μP kinds whose LR scales with base width / width


def mup_lr_multipliers(cfg: ModelConfig, layout: Layout, pp_rank: int, base: int) -> dict[str, float]:
    """``{"chunk:name": multiplier}`` for this rank's parameters (the keys of engine.parameter_groups)."""
    width = cfg.hidden_size
    if base < 1 or base > width:
        raise HypercloneError(f"--mup-base-hidden-size {base} must be in 1..{width} (this model's hidden size)")
    out = {}
    for chunk in range(layout.chunks):
        for name, rules in chunk_rules(cfg, layout, pp_rank, chunk).items():
            if all(rule.mup in SCALED_KINDS for rule in rules):
                out[f"{chunk}:{name}"] = base / width
    return out
