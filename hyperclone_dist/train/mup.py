"""μP for continued pretraining of a wider model (Yang et al. 2022; warmstarting: Mallik et al. 2024).

With Adam, μP scales the learning rate of every hidden matrix (fan-in grows with width) by
base_width / width, keeps it for vectors and the input embedding, and scales the output layer's LR by the
same ratio; an LR tuned on the small model then carries over. The multipliers are per parameter group,
so the LR schedule still applies to all of them.
"""

from __future__ import annotations

import argparse

from hyperclone_dist.errors import HypercloneError

_HIDDEN_MATRICES = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight",
                    "output_layer.weight")


def mup_lr_multipliers(chunks: list, start, args: argparse.Namespace) -> dict[str, float]:
    """``{"chunk:name": multiplier}`` for this rank's parameters."""
    base = args.mup_base_hidden_size or (start.small_config.hidden_size if start.small_config else None)
    if base is None:
        raise HypercloneError("--mup needs --mup-base-hidden-size (the width the LR was tuned at) "
                              "when not cloning from a small model")
    width = start.config.hidden_size
    if base < 1 or base > width:
        raise HypercloneError(f"--mup-base-hidden-size {base} must be in 1..{width} (this model's hidden size)")
    ratio = base / width
    out = {}
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if param.dim() == 2 and name.endswith(_HIDDEN_MATRICES):
                out[f"{index}:{name}"] = ratio
    return out
