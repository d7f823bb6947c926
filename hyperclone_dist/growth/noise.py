"""Position-addressed Gaussian noise: the same numbers whichever slice of a tensor is asked for.

Row ``r`` of the noise field named (seed, parameter, tag) is ``randn(row_len)`` from a generator seeded
with a hash of those and ``r``. A slice of the field therefore depends only on the rows and columns it
covers, never on how the tensor was partitioned or which process built it: that is what makes a
TP/PP-sharded conversion bitwise equal to growing the model whole. (torch's CPU generator cannot jump
to an offset, so rows are the unit; a column slice draws its full rows and cuts them.)
"""

from __future__ import annotations

import hashlib

import torch

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads consecutive row seeds apart
_MASK63 = (1 << 63) - 1


def field_key(seed: int, name: str, tag: str) -> int:
    digest = hashlib.blake2b(f"{seed}|{name}|{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def noise_rows(key: int, rows: range, row_len: int, cols: slice = slice(None),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal noise for ``rows`` of the field ``key`` (rows ``row_len`` long), cut to ``cols``."""
    width = len(range(row_len)[cols])
    out = torch.empty(len(rows), width, dtype=dtype)
    _draw_rows(out, key, rows, row_len, cols)
    return out


def _draw_rows(out: torch.Tensor, key: int, rows: range, row_len: int, cols: slice) -> None:
    """Row by row (a few microseconds of Python each, a third of the time for rows of ~1000): whole rows are
    drawn straight into the output, cut rows through one scratch row."""
    generator = torch.Generator()
    seed, randn = generator.manual_seed, torch.randn  # bound once
    if out.shape[1] == row_len:
        for view, r in zip(out.unbind(0), rows):
            seed((key + r * _GOLDEN) & _MASK63)
            randn(row_len, generator=generator, dtype=out.dtype, out=view)
        return
    full = torch.empty(row_len, dtype=out.dtype)
    part = full[cols]
    for view, r in zip(out.unbind(0), rows):
        seed((key + r * _GOLDEN) & _MASK63)
        randn(row_len, generator=generator, dtype=out.dtype, out=full)
        view.copy_(part)


def mean_square(tensor: torch.Tensor) -> float:
    """Mean of squares, identical in every process (numpy's single-threaded pairwise sum in float64,
    rounded to 12 significant digits) so that noise scales derived from it agree bitwise."""
    value = float((tensor.detach().to(torch.float64) ** 2).numpy().mean())
    return float(f"{value:.12g}")
