"""Helpers shared by the benchmarks: resident-set readings, and a random small model on disk and in memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hyperclone_dist.builtin import random_state_dict
from hyperclone_dist.checkpoint.hf_writer import write_hf_checkpoint
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.families import FAMILIES, match_hf_name
from hyperclone_dist.hf_config import config_from_hf
from hyperclone_dist.hf_fusion import split_hf

MIB = 1024**2


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB. VmHWM rather than getrusage's ru_maxrss: on Linux ru_maxrss
    survives exec, so a child started by a large parent would report the parent's high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_small_model(path: Path, cfg: ModelConfig) -> int:
    """Random weights as a one-shard HF checkpoint; returns the bytes of the tensors."""
    state = random_state_dict(cfg)
    path.mkdir(parents=True)
    write_hf_checkpoint(path, cfg, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__,
                        torch.float32, shard_bytes=2**40, progress=False)
    return sum(t.nbytes for t in state.values())


def largest_stored_tensor(path: Path) -> int:
    """Bytes of the largest tensor in an HF directory's safetensors (a fused HF tensor counts whole)."""
    largest = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()
            for name in names:
                view = handle.get_slice(name)
                dtype = getattr(torch, _TORCH_DTYPES[view.get_dtype()])
                element = torch.tensor([], dtype=dtype).element_size()
                largest = max(largest, element * torch.Size(view.get_shape()).numel())
    return largest


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def load_small_whole(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """What a non-streaming converter starts from: every tensor of the HF directory in memory, as canonical
    tensors (a tied head is the embedding)."""
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    family = FAMILIES[cfg.family]
    hf_small = {}
    for file in sorted(path.glob("*.safetensors")):
        hf_small.update(load_file(file))
    small = {}
    for hf_name, tensor in hf_small.items():
        match = match_hf_name(family, hf_name)
        small.update(split_hf(family, match.template, tensor, match.canonical, cfg))
    small.setdefault("head.weight", small["embed.weight"])  # tied head: grown from the embedding
    return cfg, small
