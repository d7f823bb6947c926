"""Write a grown model as a Hugging Face checkpoint, one tensor in memory at a time.

Output: ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` + ``config.json`` (and the
source's tokenizer files). ``safetensors.torch.save_file`` needs every tensor of a shard in memory at
once, so shards are written here by hand in the same format: the header (names, dtypes, shapes,
offsets) is known before any tensor is computed, then tensor bytes are streamed after it.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperclone_dist.checkpoint.atomic import write_file_atomic
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.families import FAMILIES, hf_names_for
from hyperclone_dist.hf_config import config_to_hf
from hyperclone_dist.hf_fusion import fuse_hf, hf_shape
from hyperclone_dist.progress import progress_bar

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}
# what travels with the weights: the tokenizer in every form HF ships one, its chat template, generation defaults
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass
class PlannedTensor:
    name: str  # HF name
    template: str
    parts: tuple[str, ...]  # canonical tensors fused into it
    shape: tuple[int, ...]
    nbytes: int


def plan_tensors(cfg: ModelConfig, canonical: dict[str, tuple[int, ...]], dtype: torch.dtype) -> list[PlannedTensor]:
    family = FAMILIES[cfg.family]
    element = torch.tensor([], dtype=dtype).element_size()
    planned = []
    for name, template, parts in hf_names_for(family, list(canonical)):
        shape = hf_shape(family, template, [canonical[p] for p in parts])
        planned.append(PlannedTensor(name, template, parts, shape, element * torch.Size(shape).numel()))
    return planned


def _shards(tensors: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(shard: list[PlannedTensor], dtype: torch.dtype) -> bytes:
    entries, offset = {}, 0
    for t in shard:
        entries[t.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    entries["__metadata__"] = {"format": "pt"}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def copy_companions(source_dir: Path, out_dir: Path) -> list[str]:
    """Copy the files that travel with a model's weights (tokenizer, chat template, generation config)
    from ``source_dir`` into ``out_dir``, each atomically; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(source_dir) / name
        if source.is_file():
            write_file_atomic(Path(out_dir) / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
            copied.append(name)
    return copied


def write_hf_checkpoint(out_dir: Path, cfg: ModelConfig, canonical: dict[str, tuple[int, ...]],
                        produce: Callable[[str], torch.Tensor], dtype: torch.dtype = torch.float32,
                        shard_bytes: int = DEFAULT_SHARD_BYTES, source_dir: Path | None = None,
                        progress: bool = True) -> int:
    """Write into ``out_dir`` (an existing, empty directory). ``produce(name)`` returns one canonical
    tensor. Returns the number of bytes of the largest shard."""
    family = FAMILIES[cfg.family]
    tensors = plan_tensors(cfg, canonical, dtype)
    shards = _shards(tensors, shard_bytes)
    total = sum(t.nbytes for t in tensors)
    weight_map: dict[str, str] = {}
    bar = progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", enabled=progress)
    with bar:
        for k, shard in enumerate(shards):
            file_name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            with open(out_dir / file_name, "wb") as fh:
                fh.write(_header(shard, dtype))
                for t in shard:
                    fused = fuse_hf(family, t.template, [produce(p).to(dtype) for p in t.parts], cfg)
                    assert tuple(fused.shape) == t.shape, (t.name, fused.shape, t.shape)
                    fh.write(fused.view(torch.uint8).numpy().data)
                    weight_map[t.name] = file_name
                    bar.update(t.nbytes)
    if source_dir is not None:
        copy_companions(source_dir, out_dir)
    (out_dir / "config.json").write_text(json.dumps(config_to_hf(cfg, DTYPE_NAMES[dtype]), indent=2) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    # the index is the completion marker inside the directory: written last
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return max(sum(t.nbytes for t in shard) for shard in shards)
