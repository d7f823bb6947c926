"""Read legacy-layout megatron checkpoints back, one rank at a time: written by this project, or by Megatron-LM
(its model then described by its arguments, lm_config.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron import legacy
from hyperclone_dist.megatron.lm_config import model_config_from_megatron_args
from hyperclone_dist.megatron.mapping import spec_of

_OUR_GLOBALS = ("argparse.Namespace", "torch.")  # what legacy.load_rank allows: args and their dtypes


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / legacy.TRACKER).is_file()


def read_iteration(root: Path) -> int:
    """The iteration training resumes at: a ``release`` checkpoint is iteration 0, as in Megatron-LM."""
    tag = legacy.read_tracker(root)
    return 0 if tag == legacy.RELEASE else tag


def load_rank(path: Path) -> dict:
    """One rank's file, read without executing code (legacy.load_rank). A file Megatron-LM wrote also holds
    plain-data classes beside the weights (enums in its args, numpy RNG state): megatron-core's own list of
    safe globals, which Megatron-LM loads these files with, is allowed too, as importing megatron-core does.
    megatron-core (seconds to import) is imported only for a file that names a class beyond ours."""
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # unreadable: legacy.load_rank says why in one line
        named = []
    if not all(name.startswith(_OUR_GLOBALS) for name in named):
        from megatron.core.safe_globals import register_safe_globals

        # registered for good, not in a safe_globals() block: leaving one removes every class it named from
        # torch's list, also those megatron-core registered at import and needs for its own common.pt loads
        register_safe_globals()
    return legacy.load_rank(path)


class LegacyCheckpoint:
    """A legacy (fixed-layout) checkpoint: its saved layout, model config and per-rank state dicts."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tag = legacy.read_tracker(self.root)
        self.iteration = read_iteration(self.root)
        it_dir = legacy.iteration_dir(self.root, self.tag)
        # the layout, and so the rank directories' naming, is only known once the first file is read
        candidates = [it_dir / name / legacy.RANK_FILE for name in ("mp_rank_00", "mp_rank_00_000")]
        first = next((f for f in candidates if f.is_file()), None)
        if first is None:
            raise HypercloneError(f"{it_dir} holds no mp_rank_00[_000]/{legacy.RANK_FILE}")
        payload = load_rank(first)
        self.args = payload.get("args")
        config = getattr(self.args, "hyperclone_config", None)
        # ours carry their ModelConfig; one Megatron-LM wrote is described by its model arguments
        self.config = (ModelConfig.from_dict(config) if isinstance(config, dict)
                       else model_config_from_megatron_args(self.args, self.root))
        names = payload.get("model", payload.get("model0", {}))
        self.layout = Layout(tp=self.args.tensor_model_parallel_size, pp=self.args.pipeline_model_parallel_size,
                             spec=spec_of(names),
                             vpp=self.args.virtual_pipeline_model_parallel_size,
                             vocab_divisible_by=self.args.make_vocab_size_divisible_by,
                             first_stage_layers=getattr(self.args, "decoder_first_pipeline_num_layers", None),
                             last_stage_layers=getattr(self.args, "decoder_last_pipeline_num_layers", None))
        self.padded_vocab = int(self.args.padded_vocab_size)

    def _rank_file(self, tp_rank: int, pp_rank: int) -> Path:
        file = legacy.rank_dir(self.root, self.tag, self.layout, tp_rank, pp_rank) / legacy.RANK_FILE
        if not file.is_file():
            raise HypercloneError(f"{self.root}: rank file for tp={tp_rank} pp={pp_rank} is missing ({file})")
        return file

    def rank_state_dicts(self, tp_rank: int, pp_rank: int) -> list[dict[str, torch.Tensor]]:
        payload = load_rank(self._rank_file(tp_rank, pp_rank))
        if "model" in payload:
            return [payload["model"]]
        return [payload[f"model{k}"] for k in range(self.layout.chunks)]
