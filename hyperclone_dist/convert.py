"""The converter entry point: a small checkpoint in, a grown checkpoint out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hyperclone_dist.checkpoint.atomic import atomic_output_dir
from hyperclone_dist.checkpoint.hf_writer import DEFAULT_SHARD_BYTES, write_hf_checkpoint
from hyperclone_dist.checkpoint.manifest import write_manifest
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.sources import open_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("hf",)


@dataclass
class ConvertResult:
    out: Path
    small: ModelConfig
    large: ModelConfig
    largest_shard_bytes: int
    dtype: torch.dtype  # of the written weights


@torch.inference_mode()
def convert(src: str | Path, out: str | Path, spec: GrowthSpec, *, fmt: str = "hf", dtype: str | None = None,
            overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
            checksums: bool = True) -> ConvertResult:
    """Grow the checkpoint at ``src`` (HF directory, small.pt or megatron checkpoint) by ``spec`` and write it
    to ``out``.

    Tensors are grown and written one at a time; ``out`` appears only once complete, and an existing
    checkpoint there is replaced only with ``overwrite=True``. ``src`` is opened read-only. ``dtype``: of the
    written weights, by default the source's (every element is computed in float32, cast as it lands; a
    symmetric clone of a bf16 model is exact in bf16, its divisions being by powers of two). ``checksums``:
    write ``hyperclone-manifest.json`` (checkpoint/manifest.py).
    """
    if fmt not in FORMATS:
        raise HypercloneError(f"unknown output format {fmt!r} (choose from {', '.join(FORMATS)})")
    if dtype is not None and dtype not in DTYPES:
        raise HypercloneError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if shard_bytes < 1:
        raise HypercloneError(f"the shard size must be positive, got {shard_bytes / 2**30:g} GiB (--shard-size)")
    src, out = Path(src), Path(out)
    source = open_source(src)
    grower = Grower(source.config, spec, source.get, source.get_rows)
    canonical = {name: grower.shapes[name] for name in grower.names()}
    with atomic_output_dir(out, overwrite=overwrite, source=src, finish=write_manifest if checksums else None) as tmp:
        out_dtype = DTYPES[dtype] if dtype else source.dtype
        largest = write_hf_checkpoint(tmp, grower.large, canonical, grower.full, out_dtype, shard_bytes,
                                      source_dir=src if src.is_dir() else None, progress=progress)
    return ConvertResult(out, source.config, grower.large, largest, out_dtype)
