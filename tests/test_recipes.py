"""Every shipped cluster recipe passes its dry run at full size on this CPU (divisibility, per-rank shard
shapes, memory per 80 GB GPU), and the dry run refuses impossible layouts with a one-line reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from warm import pretrain_in_process

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.parent for p in (REPO / "recipes").glob("*/train.json"))
GPUS = {"gpu-100m-to-350m": 1, "llama-1b-to-4b": 16, "llama-3b-to-12b": 32, "llama-7b-to-26b": 64}
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return pretrain_in_process("--dry-run", *args)


def test_every_recipe_is_checked():
    assert {p.name for p in RECIPES} == set(GPUS), "a recipe without a dry-run world size, or a missing one"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_dry_run_fits(recipe: Path):
    proc = dry_run("--config", str(recipe / "train.json"), "--world-size", str(GPUS[recipe.name]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    fitted = [line for line in out.splitlines() if line.startswith("largest rank")]
    assert len(fitted) == 1 and fitted[0].endswith("fits"), out
    gib = float(fitted[0].split(":")[1].split("GiB")[0])
    assert 5 < gib <= 80, out  # a real estimate, inside the GPU
    config = json.loads((recipe / "train.json").read_text())
    small = json.loads((REPO / config["model_config"]).read_text())
    assert f"hidden {small['hidden_size'] * config['width_factor']}," in out  # the grown shape was checked
    assert os.access(recipe / "submit.sh", os.X_OK)


def test_per_rank_parameters_add_up_to_the_model():
    """The dry run's shard shapes, summed over ranks, are the grown model's parameter count."""
    from hyperclone_dist.config import ModelConfig
    from hyperclone_dist.growth.grow import Grower
    from hyperclone_dist.growth.spec import GrowthSpec
    from hyperclone_dist.params import canonical_shapes
    from hyperclone_dist.train.args import parse_args
    from hyperclone_dist.train.dryrun import estimate, model_shape
    from hyperclone_dist.train.run_plan import plan_run

    config = parse_args(["--config", str(REPO / "recipes/llama-3b-to-12b/train.json"), "--dry-run", "--world-size",
                         "32"])
    cfg = model_shape(config)
    ranks = estimate(config, cfg, plan_run(config, cfg, 32), 1)
    small = ModelConfig.from_dict(json.loads((REPO / "configs/models/llama-3b.json").read_text()))
    grown = Grower(small, GrowthSpec(width_factor=2), lambda name: None).large
    assert cfg == grown
    expected = sum(np_prod(s) for s in canonical_shapes(grown).values())
    padded_rows = (-(-grown.vocab_size // (128 * 4)) * 128 * 4 - grown.vocab_size) * grown.hidden_size * 2
    replicated = (2 * grown.num_layers + 1) * grown.hidden_size  # norm gains, held whole by each of 4 TP ranks
    assert sum(r.params for r in ranks) == expected + padded_rows + 3 * replicated


def np_prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


@pytest.mark.parametrize("flags, reason", [
    (["--tp", "3", "--world-size", "24"], "tp=3"),
    (["--pp", "3", "--world-size", "36"], "layers (28) are not divisible by pp x vpp = 3 x 1 = 3"),
    (["--world-size", "24", "--tp", "16"], "world size 24 is not divisible by tp x pp = 16 x 2 = 32"),
    (["--micro-batch-size", "3"], "is not divisible by micro batch 3"),
    (["--micro-batch-size", "8", "--gpu-memory-gib", "24"], "more than the 24 GiB GPU"),
])
def test_impossible_layout_fails_clearly(flags, reason):
    base = ["--config", str(REPO / "recipes/llama-3b-to-12b/train.json")]
    if "--world-size" not in flags:
        base += ["--world-size", "32"]
    proc = dry_run(*base, *flags)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain.py: error:")]
    assert len(errors) == 1 and reason in errors[0], proc.stderr


@pytest.mark.slow
def test_gpu_recipe_pipeline_runs_on_cpu(tmp_path):
    """The GPU recipe's whole pipeline with a tiny model: tokenizer, corpus, a bf16 small model saved with
    its Adam moments, the baseline and the grown-Adam clone, the report section and its figure."""
    results = tmp_path / "results.md"
    results.write_text("# Results\n\n## Other section\n\nkept\n")
    env = {**ENV, "OMP_NUM_THREADS": "1", "HYPERCLONE_CACHE": str(REPO / ".cache" / "hyperclone")}
    proc = subprocess.run([sys.executable, "recipes/gpu-100m-to-350m/run.py", "--smoke", "--out", str(tmp_path / "run"),
                           "--arms", "random", "noisy grown-adam mup", "--results", str(results)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "## Other section\n\nkept" in text and "## GPU: ~100M grown to ~350M" in text
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| random") or line.startswith("| noisy grown-adam mup")}
    assert set(rows) == {"random", "noisy grown-adam mup"}
    small_final = json.loads((tmp_path / "run/small/metrics.jsonl").read_text().splitlines()[-1])["valid/loss"]
    # the clone starts where the small (bf16) model ended: its step-0 loss is the small model's final one
    assert abs(float(rows["noisy grown-adam mup"][1]) - small_final) < 0.02
    assert float(rows["random"][1]) > small_final + 0.1
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 10_000


def test_long_budget_smoke(tmp_path):
    """The long-budget study end to end with a tiny corpus and a few steps: corpus, a small model saved with
    its moments, random, a grown-Adam clone and its control, the budget scan, the report and its figures."""
    results = tmp_path / "results.md"
    results.write_text("# Results\n\n## Other section\n\nkept\n")
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "recipes/long_budget/run.py", "--smoke", "--out", str(tmp_path / "run"),
                           "--results", str(results), "--figures", str(tmp_path / "figures")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "## Other section\n\nkept" in text and "## Long budgets: does growing pay?" in text
    assert "Floor met" in text or "Floor not met" in text
    decisive = text.split("large budget 20 steps")[1].split("###")[0]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in decisive.splitlines()
            if line.startswith("| ") and not line.startswith("| arm")}
    assert set(rows) == {"random", "noisy grown-adam fast", "small-continued grown-adam fast"}
    assert rows["random"][1] == "1" and rows["noisy grown-adam fast"][5] != "—"  # one seed, paired with its control
    small_final = json.loads((tmp_path / "run/small-10/metrics.jsonl").read_text().splitlines()[-1])["valid/loss"]
    # the clone starts at the small model's loss (function preserved), the random init far above it
    assert abs(float(rows["noisy grown-adam fast"][2].split(" ")[0]) - small_final) < 0.02
    assert float(rows["random"][2].split(" ")[0]) > small_final + 0.5
    assert "large budget 10 steps" in text  # the scan's shorter budget
    for name in ("long_budget", "long_budget_handoff", "long_budget_scan"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 10_000
