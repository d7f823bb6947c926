"""Where a run's weights come from: grown from a small model (``--clone-from``), freshly initialised
(``--init random``), read from a converted checkpoint, or resumed from a training checkpoint (``--load``).
Each gives the large model's description and, for the first two, a slice function that any rank can ask
for exactly the rows/columns it owns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hyperclone_dist.checkpoint.training_state import latest_training_state
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.data.tokenizer import HF_TOKENIZER_FILES
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.megatron import legacy, torch_dist
from hyperclone_dist.megatron.load import is_megatron_checkpoint
from hyperclone_dist.megatron.mapping import SliceFn
from hyperclone_dist.megatron.model import check_representable
from hyperclone_dist.sources import model_config_at, open_source
from hyperclone_dist.train.init_weights import random_init
from hyperclone_dist.train.run_config import StartOptions

CLONE, RANDOM, LOAD, RESUME = "clone", "random", "load", "resume"


@dataclass(frozen=True)
class StartPoint:
    mode: str  # clone | random | load (a converted checkpoint's weights) | resume (a training checkpoint)
    config: ModelConfig  # the model that trains
    slice_fn: SliceFn | None  # clone and random: every rank's slices; None: the weights come from --load
    description: str  # for the log: where the weights came from
    small_config: ModelConfig | None = None  # the clone source's description
    width_factor: int = 1  # copies of every hidden unit (the symmetry monitor compares them)
    resume_state: dict | None = None  # resume: the trainer state of the checkpoint
    tokenizer: Path | None = None  # the model's own tokenizer, where its source holds one


def own_tokenizer(path: str | Path | None) -> Path | None:
    """The Hugging Face tokenizer a model directory or checkpoint carries, if it carries one."""
    if path is None or not Path(path).is_dir():
        return None
    return Path(path) if any((Path(path) / name).is_file() for name in HF_TOKENIZER_FILES) else None


def grown_shape(small: ModelConfig, spec: GrowthSpec) -> ModelConfig:
    """The large model a growth spec makes of ``small``, without reading any weight."""
    return Grower(small, spec, lambda name: None).large


def requested_shape(start: StartOptions) -> ModelConfig | None:
    """The model --clone-from / --model-config describe (grown when cloning or when the shape is a clone's);
    None when neither is given."""
    path = start.clone_from or start.model_config
    if not path:
        return None
    if not Path(path).exists():
        raise HypercloneError(f"no such file or directory: {path}")
    cfg = model_config_at(path)
    return grown_shape(cfg, start.growth) if start.clone_from else cfg


def checkpoint_config(root: Path) -> ModelConfig:
    """The model description stored in a megatron checkpoint (converted or written by --save)."""
    if not root.is_dir():
        raise HypercloneError(f"--load {root}: no such checkpoint directory")
    it_dir = legacy.latest_dir(root)
    if not (it_dir / "metadata.json").is_file():
        raise HypercloneError(f"--load {root}: {it_dir.name} is not a torch_dist checkpoint (convert with "
                              "--format torch_dist, which loads at any layout)")
    return ModelConfig.from_dict(torch_dist.read_args(it_dir).hyperclone_config)


def resolve_start(start: StartOptions) -> StartPoint:
    load = Path(start.load) if start.load else None
    if load is not None and is_megatron_checkpoint(load):
        return _from_checkpoint(start, load)
    if load is not None and not (start.clone_from or start.model_config):
        raise HypercloneError(f"--load {load}: no checkpoint there (no {legacy.TRACKER})")
    spec = start.growth
    if start.init == CLONE:
        source = open_source(start.clone_from)
        grower = Grower(source.config, spec, source.get, source.get_rows)
        check_representable(grower.large)
        what = f"cloned from {start.clone_from} ({spec.method}, width x{spec.n}, ffn x{spec.m})"
        copies = spec.n if spec.method != "warmstart" else 1  # a warmstart's blocks are not copies of each other
        return StartPoint(CLONE, grower.large, grower.slice, what, source.config, copies,
                          tokenizer=own_tokenizer(start.clone_from))
    shape = requested_shape(start)
    check_representable(shape)
    return StartPoint(RANDOM, shape, random_init(shape, spec.seed),
                      f"random init (seed {spec.seed}), shape of {start.clone_from or start.model_config}",
                      tokenizer=own_tokenizer(start.clone_from))


def _from_checkpoint(start: StartOptions, load: Path) -> StartPoint:
    """--load of a directory holding a checkpoint: the weights (and, resuming, everything else) come from it;
    a --clone-from/--model-config given too must describe the same model, or the run would silently train
    something else than asked."""
    state = latest_training_state(load)
    saved = ModelConfig.from_dict(state["model_config"]) if state is not None else checkpoint_config(load)
    requested = requested_shape(start)
    if requested is not None and requested != saved:
        raise HypercloneError(f"--load {load}: the checkpoint's model differs from this run's (hidden "
                              f"{saved.hidden_size} vs {requested.hidden_size}, layers {saved.num_layers} vs "
                              f"{requested.num_layers}, ffn {saved.ffn_hidden_size} vs {requested.ffn_hidden_size})")
    check_representable(saved)
    tokenizer = own_tokenizer(load) or own_tokenizer(start.clone_from)
    if state is None:
        return StartPoint(LOAD, saved, None, f"loaded from {load}", tokenizer=tokenizer)
    return StartPoint(RESUME, saved, None, f"resumed from {load} (step {state.get('step')})", resume_state=state,
                      tokenizer=tokenizer)


def mup_base_width(point: StartPoint, start: StartOptions, given: int | None) -> int:
    """The width μP's LR multipliers are relative to: --mup-base-hidden-size, else the clone source's, else on
    resume the one the run started with (recorded in its checkpoint; older checkpoints: the --clone-from
    source's again)."""
    if given is not None:
        return given
    if point.small_config is not None:
        return point.small_config.hidden_size
    saved = (point.resume_state or {}).get("mup_base_hidden_size")
    if saved:
        return int(saved)
    if point.mode == RESUME and start.clone_from:
        return model_config_at(start.clone_from).hidden_size
    raise HypercloneError("--mup needs --mup-base-hidden-size (the width the LR was tuned at) "
                          "when not cloning from a small model")
