"""What every reader of a small model offers: its description and its canonical tensors, one at a time.

Readers: ``HFSource`` (checkpoint/hf_source.py), ``SmallPtSource`` (checkpoint/small_pt.py) and
``MegatronSource`` (megatron/source.py); ``hyperclone_dist.sources.open_source`` picks one for a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.params import stored_shapes


class Source(Protocol):
    path: Path
    kind: str  # for people: "hf", "small.pt", "megatron"
    config: ModelConfig
    dtype: torch.dtype  # the stored dtype of the weights

    def get(self, name: str) -> torch.Tensor:
        """One canonical tensor, ``[out, in]``, in its stored dtype (a tied copy: what it is tied to)."""
        ...

    def get_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of a canonical tensor; readers that can read them alone do."""
        return self.get(name)[lo:hi]


def stored_nbytes(source: Source) -> int:
    element = torch.tensor([], dtype=source.dtype).element_size()
    return sum(element * torch.Size(s).numel() for s in stored_shapes(source.config).values())


def check_floating(path: Path, dtypes: dict[str, str]) -> None:
    """Weights are floating point: an integer tensor means a quantized or foreign checkpoint, and growing it
    would silently write its integers as weights. ``dtypes``: stored name -> dtype name, of the others."""
    if dtypes:
        name = min(dtypes)
        raise HypercloneError(f"{path}: tensor {name} has dtype {dtypes[name]} ({len(dtypes)} such tensors); "
                              "only floating-point weights (float32, bfloat16, float16) can be grown")


def check_shape(path: Path, name: str, have: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(have) != tuple(want):
        raise HypercloneError(f"{path}: tensor {name} has shape {list(have)}, the config implies {list(want)}")
