"""Open a small model wherever it is: an HF directory, small.pt, or a megatron checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from hyperclone_dist.checkpoint.hf_source import HFSource
from hyperclone_dist.checkpoint.small_pt import SmallPtSource
from hyperclone_dist.checkpoint.source import Source
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.jsonfile import read_json_object
from hyperclone_dist.megatron.load import is_megatron_checkpoint
from hyperclone_dist.megatron.source import open_megatron_source


def open_source(path: str | Path) -> Source:
    """The reader for ``path`` (checkpoint/source.py); a missing path is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise HypercloneError(f"no such file or directory: {path}")
    if path.is_dir() and is_megatron_checkpoint(path):
        return open_megatron_source(path)
    if path.is_dir():
        return HFSource(path)
    return SmallPtSource(path)


def model_config_at(path: str | Path) -> ModelConfig:
    """The model described at ``path``: a JSON model description (configs/models/*.json) or a checkpoint."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        return ModelConfig.from_dict(read_json_object(path, "model config"))
    return open_source(path).config
