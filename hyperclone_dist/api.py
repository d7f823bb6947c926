"""Grow in a notebook: a transformers model (or a checkpoint path) in, the grown transformers model out.

    import hyperclone_dist
    big = hyperclone_dist.grow("HuggingFaceTB/SmolLM2-135M", width_factor=2, method="noisy")   # a local path
    big = hyperclone_dist.grow(model, width_factor=2, method="noisy", snr_db=10)                 # or a model

The keywords are ``hyperclone convert``'s growth flags; the grown model is built in memory from the same
growth rules, and computes the small model's function (``hyperclone verify`` measures it on files).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hyperclone_dist.checkpoint.source import Source
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.families import FAMILIES, match_hf_name
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.hf_config import config_from_hf
from hyperclone_dist.hf_fusion import split_hf
from hyperclone_dist.hf_model import build_hf_model
from hyperclone_dist.params import stored_name, stored_shapes
from hyperclone_dist.sources import open_source


class ModelSource(Source):
    """A transformers model in memory seen as canonical tensors (no copy: views of its parameters)."""

    kind = "transformers model"

    def __init__(self, model):
        self.path = Path(getattr(model.config, "_name_or_path", "") or "model")
        self.config: ModelConfig = config_from_hf(model.config.to_dict())
        family = FAMILIES[self.config.family]
        self.dtype = next(model.parameters()).dtype
        self._tensors: dict[str, torch.Tensor] = {}
        for hf_name, tensor in model.state_dict().items():
            match = match_hf_name(family, hf_name)
            if match is None:
                raise HypercloneError(f"the model's tensor {hf_name!r} is not part of a {self.config.family} model")
            if match.canonical:
                self._tensors.update(split_hf(family, match.template, tensor.detach(), match.canonical, self.config))

    def get(self, name: str) -> torch.Tensor:
        name = name if name in self._tensors else stored_name(self.config, name)
        if name not in self._tensors:
            raise HypercloneError(f"the model has no {name}")
        return self._tensors[name]


@torch.no_grad()
def grow(model, *, width_factor: int = 1, ffn_factor: int | None = None, method: str = "symmetric",
         snr_db: float = 10.0, snr_db_last: float | None = None, shrink: float = 0.5, perturb: float = 1.0,
         insert_layers: str | None = None, stack: int = 1, seed: int = 0, dtype: torch.dtype | None = None):
    """The grown transformers model (eval mode, in ``dtype``: by default the source's) of ``model``, a
    transformers causal LM or the path of an HF directory, small.pt or megatron checkpoint."""
    spec = GrowthSpec(width_factor=width_factor, ffn_factor=ffn_factor, method=method, snr_db=snr_db,
                      snr_db_last=snr_db_last, shrink=shrink, perturb=perturb, insert_layers=insert_layers,
                      stack=stack, seed=seed)
    source = open_source(model) if isinstance(model, (str, Path)) else ModelSource(model)
    grower = Grower(source.config, spec, source.get, source.get_rows)
    grown = build_hf_model(grower.large, {name: grower.full(name) for name in stored_shapes(grower.large)},
                           "the grown model")
    return grown.to(dtype or source.dtype).eval()
