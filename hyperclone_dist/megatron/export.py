"""A megatron checkpoint (grown or trained) to an HF directory or small.pt.

    hyperclone export ckpt/ --format hf --out big-hf/

Tensors come one at a time from megatron/source.py; the HF writer streams them, so nothing holds the
whole model (small.pt is one file: the model passes through memory, as befits the small models it holds).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hyperclone_dist.checkpoint import lock, small_pt
from hyperclone_dist.checkpoint.atomic import atomic_output_dir
from hyperclone_dist.checkpoint.hf_writer import write_hf_checkpoint
from hyperclone_dist.checkpoint.manifest import write_manifest
from hyperclone_dist.checkpoint.training_state import training_meta
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron.source import open_megatron_source
from hyperclone_dist.params import stored_shapes

EXPORT_FORMATS = ("hf", "small.pt")


def export_checkpoint(ckpt: str | Path, out: str | Path, fmt: str = "hf", dtype: torch.dtype | None = None,
                      overwrite: bool = False, progress: bool = True) -> ModelConfig:
    """Write a megatron checkpoint as an HF directory (streaming, one tensor at a time) or as small.pt
    (one file, so the whole model passes through memory: meant for the small models it describes)."""
    if fmt not in EXPORT_FORMATS:
        raise HypercloneError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORT_FORMATS)})")
    source = open_megatron_source(ckpt)
    cfg, out, dtype = source.config, Path(out), dtype or source.dtype
    names = stored_shapes(cfg)
    if fmt == "hf":
        with atomic_output_dir(out, overwrite=overwrite, source=Path(ckpt), finish=write_manifest) as tmp:
            write_hf_checkpoint(tmp, cfg, names, source.get, dtype, source_dir=Path(ckpt), progress=progress)
        return cfg
    if out.exists() and not overwrite:
        raise HypercloneError(f"{out} already exists (pass --overwrite to replace it)")
    with lock.held_while_writing(out):  # one writer of this file at a time, as for directories
        lock.acquire(out)
        small_pt.save(out, cfg, {name: source.get(name).to(dtype) for name in names},
                      {"exported_from": str(ckpt), **training_meta(Path(ckpt))})
    return cfg
