"""Megatron-LM's legacy checkpoint layout, fixed to one TP x PP layout:

    DIR/latest_checkpointed_iteration.txt                              # "0", or "release"
    DIR/iter_0000000/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   # {"model": ..., "args": ..., ...}
    DIR/release/...                                                    # when the tracker says "release"

With virtual pipeline stages the model chunks are stored as "model0", "model1", ... A ``release``
checkpoint is Megatron-LM's name for weights to start from: it loads one without optimizer or RNG state
and without --no-load-optim / --no-load-rng. Our readers take either kind of tracker.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hyperclone_dist.checkpoint.torch_load import torch_load
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.lm_args import TokenizerRef, model_arguments

CHECKPOINT_VERSION = 3.0
TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
RELEASE = "release"


def iteration_dir(root: Path, iteration: int | str) -> Path:
    """``iter_0000042`` for an iteration, ``release`` for Megatron-LM's release tag."""
    return root / (RELEASE if iteration == RELEASE else f"iter_{iteration:07d}")


def read_tracker(root: Path) -> int | str:
    """The tracker's iteration, or ``"release"``."""
    tracker = root / TRACKER
    if not tracker.is_file():
        raise HypercloneError(f"{root} is not a megatron checkpoint (no {TRACKER})")
    text = tracker.read_text().strip()
    if text == RELEASE:
        return RELEASE
    if not text.isdigit():
        raise HypercloneError(f"{tracker} holds {text[:40]!r}, not an iteration number or {RELEASE!r}")
    return int(text)


def latest_dir(root: Path) -> Path:
    """The directory the tracker points at."""
    return iteration_dir(root, read_tracker(root))


def tracker_text(iteration: int | str) -> str:
    return f"{iteration}\n"


def rank_dir(root: Path, iteration: int | str, layout: Layout, tp_rank: int, pp_rank: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if layout.pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return iteration_dir(root, iteration) / name


def megatron_args(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, iteration: int = 0, *,
                  fmt: str = "legacy", tokenizer: TokenizerRef | None = None) -> argparse.Namespace:
    """The checkpoint's ``args``: Megatron-LM's own arguments for the model under the names its version
    reads (megatron/lm_args.py), plus our ModelConfig under ``hyperclone_config``, which our readers use."""
    return argparse.Namespace(
        **model_arguments(cfg, layout, dtype, fmt, tokenizer),
        iteration=iteration, consumed_train_samples=0, consumed_valid_samples=0,
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
