"""Other tools' own readers on what this project writes.

- DeepSpeed's ``zero_to_fp32.py``, which DeepSpeed copies into every ``pretrain.py --save`` directory, recovers
  the weights that ``hyperclone export`` writes, tensor for tensor (compared as canonical tensors, through
  the project's megatron and HF name tables). At TP x PP > 1 it refuses the directory; run on one
  model-parallel rank's files, it returns that rank's local shards, which reassemble to the export.
- ``transformers.AutoModelForCausalLM.from_pretrained`` loads every ``--format hf`` output, from ``convert``
  and from ``export`` of legacy and torch_dist checkpoints, with no missing, unexpected or mismatched weight
  and no warning.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import pytest
import torch
from pretrain_helpers import zero_stage
from warm import failure_text, hyperclone_in_process, run_warm

from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.mapping import chunk_params
from hyperclone_dist.megatron.source import MegatronSource
from hyperclone_dist.params import stored_shapes
from hyperclone_dist.sources import open_source

# ---- DeepSpeed's zero_to_fp32.py ----------------------------------------------------------------------
TRAIN = ["--init", "random", "--model-config", "configs/models/llama-tiny.json", "--train-iters", "2",
         "--global-batch-size", "4", "--micro-batch-size", "2", "--seq-length", "32", "--eval-iters", "1",
         "--no-progress"]
# run name -> (processes, layout, ZeRO stage): ZeRO-1 and ZeRO-2 over two data-parallel ranks, so that
# zero_to_fp32 has two optimizer partitions to join; ZeRO-1 at TP2 x PP2 (ZeRO-2 is refused with PP > 1)
SAVES = {"zero1-dp2": (2, Layout(), 1), "zero2-dp2": (2, Layout(), 2), "tp2-pp2": (4, Layout(tp=2, pp=2), 1)}
STACK = "chunks"  # train/step.py ChunkStack: the module DeepSpeed wraps holds this rank's chunks under it


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> Path:
    """Each run's ``--save`` directory and its ``hyperclone export --format hf`` beside it."""
    root = tmp_path_factory.mktemp("ecosystem")
    steps = []
    for name, (nproc, layout, stage) in SAVES.items():
        flags = ["--tp", layout.tp, "--pp", layout.pp, "--deepspeed_config", f"configs/deepspeed/zero{stage}.json"]
        steps += [{"name": name, "entry": "pretrain", "nproc": nproc,
                   "run": [*TRAIN, *map(str, flags), "--save", str(root / name)]},
                  {"name": f"export {name}", "run": ["export", str(root / name), "--out", str(root / f"{name}-hf"),
                                                     "--format", "hf", "--no-progress"]}]
    for run in run_warm(steps, root / "warm").values():
        assert run["status"] == 0, failure_text(run)
    return root


def zero_to_fp32(save: Path):
    """The ``zero_to_fp32.py`` DeepSpeed copied into ``save``, as a module (the script's own code)."""
    script = save / "zero_to_fp32.py"
    assert script.is_file(), f"DeepSpeed wrote no {script.name} into {save}"
    spec = importlib.util.spec_from_file_location(f"zero_to_fp32_{save.name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rank_view(save: Path, mp_rank: int, root: Path) -> Path:
    """A directory holding one model-parallel rank's DeepSpeed files only (links), as zero_to_fp32 expects
    a checkpoint: ``latest`` and the tag directory."""
    tag = (save / "latest").read_text().strip()
    view = root / f"mp{mp_rank}"
    (view / tag).mkdir(parents=True)
    (view / "latest").write_text(tag)
    for file in (save / tag).glob(f"*mp_rank_{mp_rank:02d}_*.pt"):
        (view / tag / file.name).symlink_to(file)
    return view


class Fp32Source(MegatronSource):
    """The canonical tensors in zero_to_fp32's state dicts, one per model-parallel rank, read through the
    megatron mapping like any megatron checkpoint."""

    dtype = torch.float32

    def __init__(self, save: Path, layout: Layout, states: dict[tuple[int, int], dict[str, torch.Tensor]]):
        self.config, self.layout, self.states = open_source(save).config, layout, states
        super().__init__(save, key_prefix="")

    def local_tensors(self, pp_rank, chunk, local_name, row, layer):
        return [self.states[tp_rank, pp_rank][f"{STACK}.{chunk}.{local_name}"] for tp_rank in range(self.layout.tp)]

    def expected_keys(self, pp_rank: int) -> set[str]:
        return {f"{STACK}.{chunk}.{name}" for chunk in range(self.layout.chunks)
                for name, _, _ in chunk_params(self.config, self.layout, pp_rank, chunk)}


def max_abs_diff(recovered: MegatronSource, exported: Path) -> dict[str, float]:
    """Canonical name -> max |recovered - exported| (the HF directory read through families.py's names)."""
    hf = open_source(exported)
    diffs = {}
    for name in stored_shapes(recovered.config):
        mine, theirs = recovered.get(name), hf.get(name)
        assert mine.shape == theirs.shape, (name, mine.shape, theirs.shape)
        diffs[name] = (mine.double() - theirs.double()).abs().max().item()
    return diffs


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, (_, layout, _) in SAVES.items() if layout.world == 1])
def test_zero_to_fp32_equals_export(saves, name):
    """fp32 training: ZeRO's master copy is what the module holds, so the two agree exactly."""
    save, (nproc, _, stage) = saves / name, SAVES[name]
    tag_dir = save / (save / "latest").read_text().strip()
    assert zero_stage(tag_dir) == stage and len(list(tag_dir.glob("*_optim_states.pt"))) == nproc
    state = zero_to_fp32(save).get_fp32_state_dict_from_zero_checkpoint(str(save))
    source = Fp32Source(save, Layout(), {(0, 0): state})
    assert set(state) == source.expected_keys(0)  # every tensor it recovers is a model weight, and all are there
    diffs = max_abs_diff(source, saves / f"{name}-hf")
    assert max(diffs.values()) == 0, {k: v for k, v in diffs.items() if v}


@pytest.mark.slow
def test_zero_to_fp32_at_tp2_pp2(saves, tmp_path):
    """DeepSpeed names the files of each TP x PP rank mp_rank_XX and zero_to_fp32 counts every optimizer file
    as a data-parallel partition, so it refuses the whole directory; one rank's files give that rank's shards
    under its local names, which the megatron mapping joins into the exported model."""
    name = "tp2-pp2"
    save, layout = saves / name, SAVES[name][1]
    script = zero_to_fp32(save)
    with pytest.raises(ValueError, match="_optim_states.pt"):
        script.get_fp32_state_dict_from_zero_checkpoint(str(save))
    # megatron-core's default rank order puts TP fastest: model-parallel rank = pp_rank * tp + tp_rank
    states = {(mp % layout.tp, mp // layout.tp): script.get_fp32_state_dict_from_zero_checkpoint(
        str(rank_view(save, mp, tmp_path))) for mp in range(layout.world)}
    source = Fp32Source(save, layout, states)
    for (_, pp_rank), state in states.items():
        assert set(state) == source.expected_keys(pp_rank)
    diffs = max_abs_diff(source, saves / f"{name}-hf")
    assert max(diffs.values()) == 0, {k: v for k, v in diffs.items() if v}


# ---- transformers' from_pretrained ------------------------------------------------------------------
# tiny model (tests/conftest.py) -> width factor: 1 keeps a tied head tied, 2 unties it (the head needs /n)
HF_CASES = {"gpt2-tied": 1, "gpt2-untied": 2, "llama-gqa2": 2, "llama-mqa-tied-bias": 1, "mistral-gqa2": 2,
            "qwen2-tied": 2, "qwen3": 2, "qwen3-tied": 1}
# how the HF directory is made: convert straight to HF, or to megatron shards at a layout and export those
ROUTES = {"convert": None, "torch_dist-tp2": ["--format", "torch_dist", "--tp", "2"],
          "legacy-pp2": ["--format", "legacy", "--pp", "2"]}


def hf_output(src: Path, out: Path, width: int, route: str) -> Path:
    grow = ["convert", src, "--width-factor", width, "--no-progress"]
    if ROUTES[route] is None:
        made = hyperclone_in_process(*grow, "--out", out, "--format", "hf")
        assert made.returncode == 0, made.stderr[-3000:]
        return out
    made = hyperclone_in_process(*grow, "--out", out.with_name("megatron"), *ROUTES[route])
    assert made.returncode == 0, made.stderr[-3000:]
    exported = hyperclone_in_process("export", out.with_name("megatron"), "--out", out, "--format", "hf",
                                     "--no-progress")
    assert exported.returncode == 0, exported.stderr[-3000:]
    return out


class Records(logging.Handler):
    """What transformers logs at WARNING and above: its load report (missing, unexpected, mismatched and
    conversion problems) among it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_reporting(path: Path):
    """from_pretrained with transformers' logger at WARNING (the test session keeps it at ERROR) and every
    Python warning recorded: (model, loading info, log messages, warnings)."""
    import transformers

    logger, handler = transformers.logging.get_logger(), Records()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)
    return model, info, handler.messages, [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_loads_without_complaint(tiny_model_dirs, tmp_path, case, route):
    width = HF_CASES[case]
    out = hf_output(tiny_model_dirs[case], tmp_path / "hf", width, route)
    model, info, logged, caught = load_reporting(out)
    assert {key: value for key, value in info.items() if value} == {}  # missing, unexpected, mismatched, errors
    assert logged == [] and caught == [], logged + caught
    config = open_source(out).config
    assert model.config.tie_word_embeddings == config.tie_word_embeddings == (width == 1 and "tied" in case)
    if config.tie_word_embeddings:  # tied for real: the head is the embedding, not a fresh matrix
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
