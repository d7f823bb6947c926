"""A megatron checkpoint (grown or trained) seen as canonical tensors, for export to HF or small.pt.

    hyperclone export ckpt/ --format hf --out big-hf/

``MegatronSource.get(name)`` assembles one canonical tensor at a time: from the TP ranks' files of a
legacy checkpoint, or from one layer's slice of a torch_dist tensor (loaded through megatron's
dist_checkpointing, so only that slice is read). Nothing holds the whole model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron import legacy, torch_dist
from hyperclone_dist.megatron.load import LegacyCheckpoint, read_iteration
from hyperclone_dist.megatron.mapping import (TE_RENAMES, TP_AXIS, VOCAB, POSITIONS, Layout, MegatronParam,
                                              chunk_params, split_local)
from hyperclone_dist.params import canonical_shapes


def torch_dist_key(local_name: str) -> str:
    """The checkpoint key megatron gives a local-spec parameter: layer index dropped (layers are stacked
    on a leading axis) and norms named as in the TransformerEngine spec."""
    if not local_name.startswith("decoder.layers."):
        return local_name
    rest = local_name.split(".", 3)[3]
    return "decoder.layers." + TE_RENAMES.get(rest, rest)


class MegatronSource:
    def __init__(self, root: str | Path, key_prefix: str = ""):
        """``key_prefix`` reads tensors saved under prefixed keys beside the model (the optimizer's moments,
        train/moments.py), shaped and sharded like the parameters."""
        self.root = Path(root)
        self.key_prefix = key_prefix
        it_dir = legacy.iteration_dir(self.root, read_iteration(self.root))
        self.format = "torch_dist" if (it_dir / "metadata.json").is_file() else "legacy"
        if self.format == "torch_dist":
            self._it_dir = it_dir
            args = torch_dist.read_args(it_dir)
            self.config = ModelConfig.from_dict(args.hyperclone_config)
            self.layout = Layout()  # read as one TP1 x PP1 view, slice by slice
            self.padded_vocab = int(args.padded_vocab_size)
        else:
            self._legacy = LegacyCheckpoint(self.root)
            self.config, self.layout = self._legacy.config, self._legacy.layout
            self.padded_vocab = self._legacy.padded_vocab
            self._rank_cache: dict[tuple[int, int], list[dict[str, torch.Tensor]]] = {}
        self.shapes = canonical_shapes(self.config)
        self._where = self._index()
        self._parts_cache: dict[str, torch.Tensor] = {}

    def _index(self) -> dict[str, tuple[int, int, str, MegatronParam, int | None]]:
        """canonical name -> (pp_rank, chunk, local name, row, layer) of the parameter holding it."""
        where = {}
        for pp_rank in range(self.layout.pp):
            for chunk in range(self.layout.chunks):
                for name, row, layer in chunk_params(self.config, self.layout, pp_rank, chunk):
                    if name == "output_layer.weight" and row.parts == ("embed.weight",):
                        continue  # a tied head's copy of the embedding
                    for part in row.parts:
                        where.setdefault(part.format(i=layer), (pp_rank, chunk, name, row, layer))
        return where

    def get(self, name: str) -> torch.Tensor:
        if name == "head.weight" and self.config.tie_word_embeddings:
            name = "embed.weight"
        if name in self._parts_cache:
            return self._parts_cache.pop(name)
        if name not in self._where:
            raise HypercloneError(f"{self.root}: the checkpoint holds no {name}")
        pp_rank, chunk, local_name, row, layer = self._where[name]
        if self.format == "torch_dist":
            pieces = [self._load_torch_dist(local_name, row, layer)]
        else:
            pieces = [self._legacy_rank(tp_rank, pp_rank)[chunk][local_name] for tp_rank in range(self.layout.tp)]
        per_part = [split_local(self.config, self.layout, row, piece) for piece in pieces]
        axis = TP_AXIS[row.split]
        parts = {}
        for k, part in enumerate(row.parts):
            ranks = [p[k] for p in per_part]
            whole = ranks[0] if axis is None else torch.cat(ranks, dim=axis)
            if row.split == VOCAB:
                whole = whole[: self.config.vocab_size]
            if row.split == POSITIONS and self.config.position_offset:  # rows before position 0 never served
                pad = torch.zeros(self.config.position_offset, *whole.shape[1:], dtype=whole.dtype)
                whole = torch.cat([pad, whole])
            parts[part.format(i=layer)] = whole.contiguous()
        self._parts_cache = {k: v for k, v in parts.items() if k != name}  # siblings of a fused tensor
        return parts[name]

    def _legacy_rank(self, tp_rank: int, pp_rank: int) -> list[dict[str, torch.Tensor]]:
        key = (tp_rank, pp_rank)
        if key not in self._rank_cache:
            if len(self._rank_cache) >= self.layout.tp:  # keep one pipeline stage's files mapped at a time
                self._rank_cache.clear()
            self._rank_cache[key] = self._legacy.rank_state_dicts(tp_rank, pp_rank)  # memory-mapped
        return self._rank_cache[key]

    def _load_torch_dist(self, local_name: str, row: MegatronParam, layer: int | None) -> torch.Tensor:
        """One layer's slice of a (layer-stacked) torch_dist tensor, read straight from the DCP files."""
        from hyperclone_dist.megatron.mapping import local_shape

        shape = list(local_shape(self.config, self.layout, row, layer))
        if row.split == VOCAB:
            shape[0] = self.padded_vocab
        key = self.key_prefix + torch_dist_key(local_name)
        if layer is not None:
            shape.insert(0, 1)
        buffer = torch.empty(shape, dtype=torch.float32)
        offsets = [0] * len(shape) if layer is None else [layer] + [0] * (len(shape) - 1)
        with warnings.catch_warnings(), torch_dist.damage_reported(self._it_dir):
            warnings.simplefilter("ignore")  # DCP warns that no_dist (one reader, no process group) is meant
            load({key: buffer}, storage_reader=FileSystemReader(str(self._it_dir)),
                 planner=_SlicePlanner(key, offsets, shape), no_dist=True)
        return buffer[0] if layer is not None else buffer


class _SlicePlanner(DefaultLoadPlanner):
    """A DCP load planner that reads one rectangular region of a saved tensor into a plain buffer.
    torch's default planner only fills whole tensors (or ShardedTensors whose shards cover the tensor),
    so reading a single layer of a layer-stacked tensor needs its own read items."""

    def __init__(self, key: str, offsets: list[int], shape: list[int]):
        super().__init__()
        self.key = key
        self.chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(shape))

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]  # the buffer is the region itself

    def create_local_plan(self) -> LoadPlan:
        if self.key not in self.metadata.state_dict_metadata:
            raise HypercloneError(f"the torch_dist checkpoint has no tensor {self.key}")
        saved = self.metadata.state_dict_metadata[self.key]
        return LoadPlan(create_read_items_for_chunk_list(self.key, saved, [self.chunk]))


EXPORT_FORMATS = ("hf", "small.pt")


@torch.inference_mode()
def training_meta(ckpt: Path) -> dict:
    """What a later run's hand-off schedule needs from a training checkpoint written by pretrain.py: the
    steps taken and the LR of its last update (empty for a converted checkpoint or an unreadable state)."""
    from hyperclone_dist.train.checkpointing import latest_training_state
    from hyperclone_dist.train.schedules import LRSchedule

    try:
        state = latest_training_state(ckpt)
        if state is None:
            return {}
        schedule = LRSchedule(**state["schedule"])
        step = int(state["step"])
    except (HypercloneError, ValueError, KeyError, TypeError):
        return {}
    return {"train_steps": step, "final_lr": schedule.lr(max(0, step - 1)), "peak_lr": schedule.peak_lr}


def export_checkpoint(ckpt: str | Path, out: str | Path, fmt: str = "hf", dtype: torch.dtype = torch.float32,
                      overwrite: bool = False, progress: bool = True) -> ModelConfig:
    """Write a megatron checkpoint as an HF directory (streaming, one tensor at a time) or as small.pt
    (one file, so the whole model passes through memory: meant for the small models it describes)."""
    from hyperclone_dist.checkpoint import lock, small_pt
    from hyperclone_dist.checkpoint.atomic import atomic_output_dir
    from hyperclone_dist.checkpoint.hf_writer import write_hf_checkpoint

    if fmt not in EXPORT_FORMATS:
        raise HypercloneError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORT_FORMATS)})")
    source = MegatronSource(ckpt)
    cfg, out = source.config, Path(out)
    names = canonical_shapes(cfg, with_head=not cfg.tie_word_embeddings)
    if fmt == "hf":
        with atomic_output_dir(out, overwrite=overwrite, source=Path(ckpt)) as tmp:
            write_hf_checkpoint(tmp, cfg, names, source.get, dtype, progress=progress)
        return cfg
    if out.exists() and not overwrite:
        raise HypercloneError(f"{out} already exists (pass --overwrite to replace it)")
    with lock.held_while_writing(out):  # one writer of this file at a time, as for directories
        lock.acquire(out)
        small_pt.save(out, cfg, {name: source.get(name).to(dtype) for name in names},
                      {"exported_from": str(ckpt), **training_meta(Path(ckpt))})
    return cfg
