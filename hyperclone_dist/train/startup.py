"""Where a run's weights come from: grown from a small model (``--clone-from``), freshly initialised
(``--init random``), or read from a checkpoint (``--load``). Each gives the large model's description and a
slice function that any rank can ask for exactly the rows/columns it owns."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron.mapping import SliceFn


@dataclass
class StartPoint:
    config: ModelConfig  # the model that trains
    slice_fn: SliceFn | None  # None: the weights come from the --load checkpoint
    description: str  # for the log: where the weights came from
    small_config: ModelConfig | None = None  # the clone source's description
    width_factor: int = 1  # copies of every hidden unit (the symmetry monitor compares them)
    ffn_factor: int = 1


def _growth_spec(args: argparse.Namespace):
    from hyperclone_dist.cli.main import growth_spec

    return growth_spec(args)


def open_source(path: Path):
    """A small model to grow from: small.pt, an HF directory, or a megatron checkpoint (converted, or
    written by pretrain.py --save), each seen as canonical tensors."""
    from hyperclone_dist.checkpoint.reader import SourceCheckpoint
    from hyperclone_dist.megatron.load import is_megatron_checkpoint

    if path.is_dir() and is_megatron_checkpoint(path):
        from hyperclone_dist.megatron.export import MegatronSource

        source = MegatronSource(path)
        source.get_rows = None
        return source
    return SourceCheckpoint(path)


def _config_from_path(path: Path) -> ModelConfig:
    if path.suffix == ".json" and path.is_file():
        from hyperclone_dist.jsonfile import read_json_object

        return ModelConfig.from_dict(read_json_object(path, "model config"))
    return open_source(path).config


def resolve_start(args: argparse.Namespace) -> StartPoint:
    from hyperclone_dist.growth.grow import Grower
    from hyperclone_dist.megatron.model import check_representable
    from hyperclone_dist.train.init_weights import random_init

    spec = _growth_spec(args)
    if args.init == "clone" and args.clone_from:
        source = open_source(Path(args.clone_from))
        grower = Grower(source.config, spec, source.get, source.get_rows)
        check_representable(grower.large)
        what = f"cloned from {args.clone_from} ({spec.method}, width x{spec.n}, ffn x{spec.m})"
        copies = spec.n if spec.method != "warmstart" else 1  # a warmstart's blocks are not copies of each other
        return StartPoint(grower.large, grower.slice, what, source.config, copies, spec.m)
    if args.init == "random" and (args.clone_from or args.model_config):
        path = Path(args.clone_from or args.model_config)
        if not path.exists():
            raise HypercloneError(f"no such file or directory: {path}")
        small = _config_from_path(path)
        grown = Grower(small, spec, lambda name: None).large if args.clone_from else small
        check_representable(grown)
        return StartPoint(grown, random_init(grown, spec.seed), f"random init (seed {spec.seed}), shape of {path}")
    if args.load:
        return StartPoint(checkpoint_config(Path(args.load)), None, f"loaded from {args.load}")
    raise HypercloneError("nothing to start from: give --clone-from, --model-config or --load")


def checkpoint_config(root: Path) -> ModelConfig:
    """The model description stored in a megatron checkpoint (converted or written by --save)."""
    from hyperclone_dist.megatron import torch_dist
    from hyperclone_dist.megatron.legacy import iteration_dir
    from hyperclone_dist.megatron.load import read_iteration

    if not root.is_dir():
        raise HypercloneError(f"--load {root}: no such checkpoint directory")
    it_dir = iteration_dir(root, read_iteration(root))
    if not (it_dir / "metadata.json").is_file():
        raise HypercloneError(f"--load {root}: {it_dir.name} is not a torch_dist checkpoint (convert with "
                              "--format torch_dist, which loads at any layout)")
    return ModelConfig.from_dict(torch_dist.read_args(it_dir).hyperclone_config)
