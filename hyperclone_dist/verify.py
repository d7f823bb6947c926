"""Function preservation, measured: logits of the small and the grown model on the same tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.hf_model import load_hf_model


@dataclass
class LogitDiff:
    max_abs: float  # max |logit_small - logit_grown| over batch, positions and the real vocab
    max_rel: float  # max_abs / max |logit_small|: scale-free, well defined where logits cross zero
    seq_len: int
    batch: int

    def ok(self, tol: float) -> bool:
        return self.max_rel <= tol


def fixed_batch(vocab_size: int, seq_len: int, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator)


def logit_diff(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    reference, other = reference.double(), other.double()
    max_abs = (reference - other).abs().max().item()
    return max_abs, max_abs / max(reference.abs().max().item(), 1e-30)


@torch.inference_mode()
def compare_checkpoints(small: str | Path, grown: str | Path, seq_len: int | None = None, batch: int = 2,
                        seed: int = 1234) -> LogitDiff:
    """Run both models (float32) on one seeded batch of token ids; the default length is the full context."""
    small_model = load_hf_model(small)
    grown_model = load_hf_model(grown)
    vocab = small_model.config.vocab_size
    if grown_model.config.vocab_size != vocab:
        raise HypercloneError(f"vocab sizes differ: small {vocab}, grown {grown_model.config.vocab_size}")
    context = min(_context(small_model), _context(grown_model))
    seq_len = seq_len or context
    if not 1 <= seq_len <= context:
        raise HypercloneError(f"--seq-len {seq_len} is outside 1..{context} (the models' context)")
    ids = fixed_batch(vocab, seq_len, batch, seed)
    max_abs, max_rel = logit_diff(small_model(ids).logits[..., :vocab], grown_model(ids).logits[..., :vocab])
    return LogitDiff(max_abs, max_rel, seq_len, batch)


def _context(model) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise HypercloneError("cannot tell the model's context length from its config")
