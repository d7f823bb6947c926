"""Function preservation, measured: logits of the small and the grown model on the same tokens.

What is compared, by default: a batch of random token sequences from position 0, and, when the context is
long, one more sequence placed at the last positions of the context (position ids ``C - w .. C - 1``), so the
positions a full-context pass would reach (RoPE frequencies and their scaling, the end of a learned table)
are checked without the cost of attending over the whole context. ``--seq-len N`` compares N contiguous
tokens from position 0 instead (``--seq-len`` of the full context: the full pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.hf_model import load_hf_model

DEFAULT_WINDOW = 256  # tokens of each default window; a context up to twice this is compared whole


@dataclass(frozen=True)
class Window:
    batch: int  # sequences
    length: int  # tokens each
    first_position: int  # position id of the first token

    def describe(self) -> str:
        last = self.first_position + self.length - 1
        return f"{self.batch} x {self.length} tokens at positions {self.first_position}-{last}"


def windows(context: int, seq_len: int | None, batch: int, tail: bool = True) -> list[Window]:
    """What a comparison covers (see the module docstring); ``tail=False``: no window at the end of the
    context (megatron-core applies RoPE by a token's index in the sequence, not by its position id)."""
    if seq_len is not None:
        if not 1 <= seq_len <= context:
            raise HypercloneError(f"--seq-len {seq_len} is outside 1..{context} (the models' context)")
        return [Window(batch, seq_len, 0)]
    if context <= 2 * DEFAULT_WINDOW:
        return [Window(batch, context, 0)]
    head = [Window(batch, DEFAULT_WINDOW, 0)]
    return [*head, Window(1, DEFAULT_WINDOW, context - DEFAULT_WINDOW)] if tail else head


@dataclass
class LogitDiff:
    max_abs: float  # max |logit_small - logit_grown| over every window, position and the real vocab
    max_rel: float  # max_abs / max |logit_small|: scale-free, well defined where logits cross zero
    checked: str  # what was compared, for the report

    def ok(self, tol: float) -> bool:
        return self.max_rel <= tol


def fixed_batch(vocab_size: int, seq_len: int, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator)


def window_tokens(vocab_size: int, window: Window, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, position ids) of one window, the same for both models."""
    ids = fixed_batch(vocab_size, window.length, window.batch, seed + window.first_position)
    positions = torch.arange(window.first_position, window.first_position + window.length).expand_as(ids)
    return ids, positions


def logit_diff(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    reference, other = reference.double(), other.double()
    max_abs = (reference - other).abs().max().item()
    return max_abs, max_abs / max(reference.abs().max().item(), 1e-30)


def combine(diffs: list[tuple[float, float, float]], checked: list[Window]) -> LogitDiff:
    """One LogitDiff over windows, from each window's (max |Δ|, max |reference|)."""
    max_abs = max(d for d, _ in diffs)
    scale = max(r for _, r in diffs)
    return LogitDiff(max_abs, max_abs / max(scale, 1e-30), "; ".join(w.describe() for w in checked))


@torch.inference_mode()
def compare_checkpoints(small: str | Path, grown: str | Path, seq_len: int | None = None, batch: int = 2,
                        seed: int = 1234) -> LogitDiff:
    """Run both models (float32, whatever their stored dtype) on the same seeded token ids."""
    small_model = load_hf_model(small)
    grown_model = load_hf_model(grown)
    vocab = small_model.config.vocab_size
    if grown_model.config.vocab_size != vocab:
        raise HypercloneError(f"vocab sizes differ: small {vocab}, grown {grown_model.config.vocab_size}")
    checked = windows(min(_context(small_model), _context(grown_model)), seq_len, batch)
    diffs = []
    for window in checked:
        ids, positions = window_tokens(vocab, window, seed)
        reference = small_model(ids, position_ids=positions).logits[..., :vocab].double()
        other = grown_model(ids, position_ids=positions).logits[..., :vocab].double()
        diffs.append(((reference - other).abs().max().item(), reference.abs().max().item()))
    return combine(diffs, checked)


def _context(model) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise HypercloneError("cannot tell the model's context length from its config")
