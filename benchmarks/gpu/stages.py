"""The GPU check's stages as commands: one definition that the GPU run executes and the CPU dry run validates
(each pretrain.py command through pretrain.py's own --dry-run, each helper through its own parser).

Sizes are chosen to fit 8 minutes of one H200, start-ups included (imports, growth, engine: estimated at
20-30 s a process):
- (b)/(c): the GPU recipe's large run (recipes/gpu-100m-to-350m/train.json: 352M, bf16, 32 x 1024 tokens a
  step), cloned from a random small model of the recipe's small shape, --steps steps, a log line every step
  (the first logged loss is step 1's);
- (d): configs/models/llama-1b.json (1.10B) at sequence 2048, micro batch 2: megatron's local layer spec
  computes attention unfused and keeps b x heads x s^2 scores per layer for backward (bf16 scores, float32
  softmax, bf16 probabilities: ~2 GiB a layer at micro 2, which pretrain.py --dry-run's fused-attention
  estimate leaves out), so micro 4 would come near the card's memory;
- (e): the recipe itself with fewer steps and two arms, its corpus seeded with the one (b) uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SMALL_CONFIG = "configs/models/llama-100m.json"  # the GPU recipe's small shape
ONE_B_CONFIG = "configs/models/llama-1b.json"
RECIPE = "recipes/gpu-100m-to-350m"
GPU_MEMORY_GIB = 139  # one H200 as the device machine reports it
STEPS_1B, WARMUP_1B = 12, 4  # (d): steps, and the first ones left out of the median
RECIPE_STEPS = {"--small-steps": 60, "--steps": 60, "--eval-interval": 20}


@dataclass(frozen=True)
class Stage:
    key: str  # short name: logs/<key>.log, results/<key>.json
    title: str
    argv: tuple[str, ...]  # run from the repository root; argv[0] is the interpreter
    cap_s: int  # its own time limit
    min_s: int  # not started with less time than this left in the budget
    kind: str  # how the dry run checks it: "helper" (its parser), "pretrain" (--dry-run), "recipe"
    needs: tuple[str, ...] = ()  # stages that must have succeeded first


def pretrain_flags(work: Path, small: Path, prefix: str, tokenizer: str, steps: int) -> list[str]:
    """Stage (b): the recipe's large run for ``steps`` steps; stage (c) builds its model from the same flags."""
    return ["--config", f"{RECIPE}/train.json", "--clone-from", str(small), "--train-iters", str(steps),
            "--lr-warmup-iters", "5", "--lr-decay-style", "constant", "--log-interval", "1",
            "--eval-interval", str(steps), "--eval-iters", "2", "--data-path", prefix, "--tokenizer-model", tokenizer,
            "--no-progress", "--metrics-file", str(work / "b" / "metrics.jsonl")]


def one_b_flags(work: Path, prefix: str, tokenizer: str) -> list[str]:
    """Stage (d): a random-init ~1B model; the 16384-piece corpus feeds its 32000-entry vocabulary (ids fit)."""
    return ["--init", "random", "--model-config", ONE_B_CONFIG, "--bf16", "--deepspeed_config",
            "configs/deepspeed/zero1_bf16.json", "--seq-length", "2048", "--micro-batch-size", "2",
            "--global-batch-size", "32", "--train-iters", str(STEPS_1B), "--lr", "3e-4", "--log-interval", "1",
            "--data-path", prefix, "--tokenizer-model", tokenizer, "--no-progress",
            "--metrics-file", str(work / "d" / "metrics.jsonl")]


def recipe_args(work: Path) -> list[str]:
    shortened = [str(x) for kv in RECIPE_STEPS.items() for x in kv]
    return ["--gpus", "1", "--out", str(work / "e"), *shortened, "--arms", "random", "noisy",
            "--results", str(work / "e" / "results.md"), "--figure", str(work / "e" / "loss_curves.png")]


def setup(py: str, work: Path, cache: Path, site: str | None) -> list[Stage]:
    """What every other stage needs: the machine described, and the inputs (results/inputs.json says where)."""
    here, results = "benchmarks/gpu", work / "results"
    env = [py, f"{here}/gpu_common.py", "env", "--out", str(results / "env.json"), *(["--site", site] if site else [])]
    return [
        Stage("env", "the machine and its packages", tuple(env), 90, 10, "helper"),
        Stage("inputs", "corpus, random small model, recipe data", (
            py, f"{here}/prepare_inputs.py", "--model-config", SMALL_CONFIG, "--cache", str(cache), "--small",
            str(work / "small.pt"), "--recipe-data", str(work / "e" / "data"), "--json-out",
            str(results / "inputs.json")), 150, 20, "helper"),
    ]


def measured(py: str, work: Path, corpus: tuple[str, str], steps: int) -> list[Stage]:
    """Stages (a)-(e); ``corpus`` is the (prefix, tokenizer) the inputs stage made."""
    here, results = "benchmarks/gpu", work / "results"
    prefix, tokenizer = corpus
    flags_b = pretrain_flags(work, work / "small.pt", prefix, tokenizer, steps)
    return [
        Stage("a", "built-in model grown x2, logits on the GPU", (
            py, f"{here}/grow_verify.py", "--out", str(results / "grow.json"), "--work", str(work / "a")),
            90, 20, "helper"),
        Stage("b", f"pretrain.py --clone-from, bf16, {steps} steps", (py, "launch/pretrain.py", *flags_b),
              180, 60, "pretrain", ("inputs",)),
        Stage("c", "bare PyTorch bf16 loop, same model and steps", (
            py, f"{here}/bare_loop.py", "--steps", str(steps), "--warmup", str(steps // 5),
            "--out", str(results / "bare.json"), "--", *flags_b), 150, 50, "helper", ("inputs",)),
        Stage("d", "~1B model's MFU at sequence 2048",
              (py, "launch/pretrain.py", *one_b_flags(work, prefix, tokenizer)), 180, 60, "pretrain", ("inputs",)),
        Stage("e", "GPU recipe, shortened", (py, f"{RECIPE}/run.py", *recipe_args(work)), 400, 120, "recipe",
              ("inputs",)),
    ]
