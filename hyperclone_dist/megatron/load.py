"""Read megatron checkpoints written by this project (legacy layout) back, one rank at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron import legacy


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / legacy.TRACKER).is_file()


def read_iteration(root: Path) -> int:
    tracker = root / legacy.TRACKER
    if not tracker.is_file():
        raise HypercloneError(f"{root} is not a megatron checkpoint (no {legacy.TRACKER})")
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise HypercloneError(f"{tracker} holds {text[:40]!r}, not an iteration number")
    return int(text)


class LegacyCheckpoint:
    """A legacy (fixed-layout) checkpoint: its saved layout, model config and per-rank state dicts."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.iteration = read_iteration(self.root)
        it_dir = legacy.iteration_dir(self.root, self.iteration)
        # the layout, and so the rank directories' naming, is only known once the first file is read
        candidates = [it_dir / name / legacy.RANK_FILE for name in ("mp_rank_00", "mp_rank_00_000")]
        first = next((f for f in candidates if f.is_file()), None)
        if first is None:
            raise HypercloneError(f"{it_dir} holds no mp_rank_00[_000]/{legacy.RANK_FILE}")
        self.args = legacy.load_rank(first)["args"]
        config = getattr(self.args, "hyperclone_config", None)
        if not isinstance(config, dict):
            raise HypercloneError(f"{first} has no model description (args.hyperclone_config); "
                                  "was it written by hyperclone?")
        self.config = ModelConfig.from_dict(config)
        self.layout = Layout(tp=self.args.tensor_model_parallel_size, pp=self.args.pipeline_model_parallel_size,
                             vpp=self.args.virtual_pipeline_model_parallel_size,
                             vocab_divisible_by=self.args.make_vocab_size_divisible_by,
                             first_stage_layers=getattr(self.args, "decoder_first_pipeline_num_layers", None),
                             last_stage_layers=getattr(self.args, "decoder_last_pipeline_num_layers", None))
        self.padded_vocab = int(self.args.padded_vocab_size)

    def _rank_file(self, tp_rank: int, pp_rank: int) -> Path:
        file = legacy.rank_dir(self.root, self.iteration, self.layout, tp_rank, pp_rank) / legacy.RANK_FILE
        if not file.is_file():
            raise HypercloneError(f"{self.root}: rank file for tp={tp_rank} pp={pp_rank} is missing ({file})")
        return file

    def rank_state_dicts(self, tp_rank: int, pp_rank: int) -> list[dict[str, torch.Tensor]]:
        payload = legacy.load_rank(self._rank_file(tp_rank, pp_rank))
        if "model" in payload:
            return [payload["model"]]
        return [payload[f"model{k}"] for k in range(self.layout.chunks)]
