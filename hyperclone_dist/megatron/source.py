"""A megatron checkpoint (grown or trained, legacy or torch_dist) seen as canonical tensors: the source of
``hyperclone export``, of ``pretrain.py --clone-from`` a checkpoint, and of grown optimizer state.

``MegatronSource.get(name)`` assembles one canonical tensor at a time: from the TP ranks' files of a
legacy checkpoint, or from one layer's slice of a torch_dist tensor (loaded through PyTorch DCP, so only
that slice is read). Nothing holds the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from hyperclone_dist.checkpoint.source import Source
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron import legacy, torch_dist
from hyperclone_dist.megatron.load import LegacyCheckpoint
from hyperclone_dist.megatron.mapping import (
    POSITIONS,
    TP_AXIS,
    VOCAB,
    Layout,
    MegatronParam,
    chunk_params,
    gathers_over_tp,
    local_shape,
    split_local,
    torch_dist_key,
)
from hyperclone_dist.params import stored_name


class MegatronSource(Source):
    """What both megatron formats share: the canonical tensors assembled from megatron's local tensors,
    one table row (mapping.py) at a time. A subclass says where a row's local tensors are."""

    kind = "megatron"
    config: ModelConfig
    layout: Layout  # the layout the local tensors are read at

    def __init__(self, root: Path, key_prefix: str):
        self.root = self.path = root
        self.key_prefix = key_prefix
        self._where = self._index()
        self._parts_cache: dict[str, torch.Tensor] = {}

    def _index(self) -> dict[str, tuple[int, int, str, MegatronParam, int | None]]:
        """canonical name -> (pp_rank, chunk, local name, row, layer) of the parameter holding it."""
        where = {}
        for pp_rank in range(self.layout.pp):
            for chunk in range(self.layout.chunks):
                for name, row, layer in chunk_params(self.config, self.layout, pp_rank, chunk):
                    for part in row.parts:  # stage 0 first: a later stage's copy of a tied tensor is not read
                        where.setdefault(part.format(i=layer), (pp_rank, chunk, name, row, layer))
        return where

    def local_tensors(self, pp_rank: int, chunk: int, local_name: str, row: MegatronParam,
                      layer: int | None) -> list[torch.Tensor]:
        """The row's local tensor on every TP rank of the reading layout, in TP order."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        name = stored_name(self.config, name)
        if name in self._parts_cache:
            return self._parts_cache.pop(name)
        if name not in self._where:
            raise HypercloneError(f"{self.root}: the checkpoint holds no {name}")
        pp_rank, chunk, local_name, row, layer = self._where[name]
        pieces = self.local_tensors(pp_rank, chunk, local_name, row, layer)
        layout = self.layout
        if gathers_over_tp(self.config, layout, row):  # only the ranks together hold whole query groups
            pieces, layout = [torch.cat(pieces, dim=TP_AXIS[row.split])], Layout()
        per_part = [split_local(self.config, layout, row, piece) for piece in pieces]
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


class LegacySource(MegatronSource):
    """A legacy checkpoint, read at the layout it was saved at: each rank's file memory-mapped."""

    def __init__(self, root: Path, key_prefix: str = ""):
        if key_prefix:
            raise HypercloneError(f"{root} is a legacy checkpoint: it holds the model only")
        self._legacy = LegacyCheckpoint(root)
        self.config, self.layout = self._legacy.config, self._legacy.layout
        self.padded_vocab = self._legacy.padded_vocab
        self.dtype = self._legacy.args.params_dtype
        self._rank_cache: dict[tuple[int, int], list[dict[str, torch.Tensor]]] = {}
        super().__init__(root, key_prefix)

    def local_tensors(self, pp_rank, chunk, local_name, row, layer):
        return [self._rank(tp_rank, pp_rank)[chunk][local_name] for tp_rank in range(self.layout.tp)]

    def _rank(self, tp_rank: int, pp_rank: int) -> list[dict[str, torch.Tensor]]:
        key = (tp_rank, pp_rank)
        if key not in self._rank_cache:
            if len(self._rank_cache) >= self.layout.tp:  # keep one pipeline stage's files mapped at a time
                self._rank_cache.clear()
            self._rank_cache[key] = self._legacy.rank_state_dicts(tp_rank, pp_rank)  # memory-mapped
        return self._rank_cache[key]


class TorchDistSource(MegatronSource):
    """A torch_dist checkpoint, read as one TP1 x PP1 view, one layer's slice of a tensor at a time."""

    def __init__(self, root: Path, key_prefix: str = ""):
        self._it_dir = legacy.latest_dir(root)
        args = torch_dist.read_args(self._it_dir)
        self.config = ModelConfig.from_dict(args.hyperclone_config)
        self.layout = Layout()
        self.padded_vocab = int(args.padded_vocab_size)
        saved = getattr(args, "params_dtype", None)
        self.dtype = saved if isinstance(saved, torch.dtype) else torch.float32  # slices are read in float32
        super().__init__(root, key_prefix)

    def local_tensors(self, pp_rank, chunk, local_name, row, layer):
        """One layer's slice of a (layer-stacked) torch_dist tensor, read straight from the DCP files."""
        shape = list(local_shape(self.config, self.layout, row, layer))
        if row.split == VOCAB:
            shape[0] = self.padded_vocab
        key = self.key_prefix + torch_dist_key(local_name)
        if layer is not None:
            shape.insert(0, 1)
        buffer = torch.empty(shape, dtype=torch.float32)
        offsets = [0] * len(shape) if layer is None else [layer] + [0] * (len(shape) - 1)
        with torch_dist.damage_reported(self._it_dir):  # DCP's no_dist warning: quiet_imports.py
            load({key: buffer}, storage_reader=FileSystemReader(str(self._it_dir)),
                 planner=_SlicePlanner(key, offsets, shape), no_dist=True)
        return [buffer[0] if layer is not None else buffer]


def open_megatron_source(root: str | Path, key_prefix: str = "") -> MegatronSource:
    """``key_prefix`` reads tensors saved under prefixed keys beside the model (the optimizer's moments,
    train/moments.py), shaped and sharded like the parameters: torch_dist checkpoints only."""
    root = Path(root)
    it_dir = legacy.latest_dir(root)
    if (it_dir / "metadata.json").is_file():
        return TorchDistSource(root, key_prefix)
    return LegacySource(root, key_prefix)


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
