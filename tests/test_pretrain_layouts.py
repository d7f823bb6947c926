"""Pretraining acceptance: real ``launch/pretrain.py`` jobs (gloo, float32) on the built-in model grown x2.

- every layout (TP, PP, interleaved PP, ZeRO-1/2 data parallel) trains like one process: the same loss and
  gradient norm at each of 20 steps, and the loss falls; one job of them is started by torchrun and one by
  the deepspeed launcher, the others are forked from one warm process (tests/warm.py), their ranks a gloo
  group with torchrun's environment, so the matrix pays the imports once;
- a ``--clone-from`` run's first loss is the small model's own loss on that batch (HF, no trainer code);
- a run stopped at step 10 and resumed writes steps 11-20 bit for bit as the run that never stopped;
- ``hyperclone export`` of the trained checkpoint gives, through transformers, the trainer's valid loss.

    .venv/bin/python -m pytest -n 0 tests/test_pretrain_layouts.py -x -q -s   # -n 0 -s: one process, printing the diffs

The real launchers' jobs run beside the warm ones (tests/pretrain_helpers.py), and the TP2xPP2 run serves
all four tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_helpers import (
    ITERS,
    ZERO1,
    ZERO2,
    Job,
    first_batches,
    hf_loss,
    max_rel,
    rel,
    run_sharing_data,
    schedule_flags,
    zero_stage,
)

from hyperclone_dist.train.engine import SHM_DIR

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS = list(range(1, ITERS + 1))
GROW = ["--width-factor", "2", "--method", "noisy"]
LAYOUT_TOL = 1e-4  # relative, every step, against one process
CLONE_TOL = 1e-5  # relative, first loss against the small model

LAYOUTS = {  # name: (processes, flags, launcher, what the job must report as "tp= pp= dp=")
    "tp1-pp1": (1, [], "warm", "tp=1 pp=1 dp=1"),
    "tp2": (2, ["--tp", "2"], "warm", "tp=2 pp=1 dp=1"),
    "pp2": (2, ["--pp", "2"], "torchrun", "tp=1 pp=2 dp=1"),
    "dp2-zero1": (2, ["--deepspeed_config", ZERO1], "warm", "tp=1 pp=1 dp=2"),
    "tp2-dp2-zero2": (4, ["--tp", "2", "--deepspeed_config", ZERO2], "warm", "tp=2 pp=1 dp=2"),
    "tp2-pp2": (4, ["--tp", "2", "--pp", "2"], "warm", "tp=2 pp=2 dp=1"),
    "pp2-vpp2-dp2": (4, ["--pp", "2", "--vpp", "2"], "warm", "tp=1 pp=2 dp=2 vpp=2"),
    "pp3-uneven": (3, ["--pp", "3", "--decoder-first-pipeline-num-layers", "1", "--decoder-last-pipeline-num-layers",
                       "1"], "warm", "tp=1 pp=3 dp=1"),  # stages of 1, 2 and 1 layers
    "tp2-pp2-zero1-deepspeed": (4, ["--tp", "2", "--pp", "2", "--deepspeed_config", ZERO1], "deepspeed",
                                "tp=2 pp=2 dp=1"),
}
REFERENCE = "tp1-pp1"
SAVED = "tp2-pp2"  # also: the noisy clone's first loss, the uninterrupted run for resume, the export
CLONES = {  # name: growth flags of a one-step TP2xPP2 run; None: the 20-step tp2-pp2 layout run (noisy)
    "noisy": None,
    "symmetric": ["--width-factor", "2", "--method", "symmetric"],
    "noisy-insert-every-2": ["--width-factor", "2", "--method", "noisy", "--insert-layers", "every:2"],
}
RESUMED = {"tp2-pp2": 1, "tp2-dp2-zero2": 2}  # layout: the ZeRO stage its optimizer checkpoint must record
STOP = 10


def layout_job(name: str, root: Path, small: Path, *extra: str, growth: list[str] = GROW,
               train_iters: int = ITERS, job_name: str | None = None) -> Job:
    nproc, flags, launcher, _ = LAYOUTS[name]
    return Job(job_name or name, nproc, ["--clone-from", str(small), *growth, *flags, *schedule_flags(train_iters),
                                         *extra], root, launcher)


@pytest.fixture(scope="module")
def small(builtin_small_pt: Path) -> Path:
    return builtin_small_pt


@pytest.fixture(scope="module")
def runs(small, tmp_path_factory) -> dict:
    """Every job of this module: the layouts, the one-step clones, and the runs stopped and resumed (the
    warm ones in this order, the real launchers' beside them)."""
    root = tmp_path_factory.mktemp("pretrain")
    jobs = [layout_job(name, root / name, small, *(["--save", str(root / name / "ckpt")] if name == SAVED else []))
            for name in LAYOUTS]
    jobs += [layout_job(SAVED, root / "clones" / name, small, growth=growth, train_iters=1, job_name=name)
             for name, growth in CLONES.items() if growth is not None]

    def resume_job(name: str, phase: str, *extra: str) -> Job:
        return layout_job(name, root / "resume" / name / phase, small, "--save", str(root / "resume" / name / "ckpt"),
                          *extra, job_name=f"{name}-{phase}")

    jobs += [resume_job(name, "stop", "--exit-interval", str(STOP)) for name in RESUMED]
    jobs += [resume_job(name, "resume", "--load", str(root / "resume" / name / "ckpt")) for name in RESUMED]
    return run_sharing_data(jobs, ITERS)


@pytest.fixture(scope="module")
def layout_runs(runs) -> dict:
    return {name: runs[name] for name in LAYOUTS}


def test_every_layout_trains_like_one_process(layout_runs):
    ref = layout_runs[REFERENCE].check()
    loss, norm = ref.series("train/loss", STEPS), ref.series("train/grad_norm", STEPS)
    assert sum(loss[-5:]) / 5 < 0.9 * loss[0], f"the loss does not fall: {loss}"
    assert ref.series("valid/loss", [ITERS])[0] < 0.9 * ref.series("valid/loss", [0])[0]
    table, bad = [], []
    for name, result in layout_runs.items():
        result.check()
        assert LAYOUTS[name][3] in (result.job.out / "log.txt").read_text(), result.log_tail()
        diffs = {"loss": max_rel(result.series("train/loss", STEPS), loss),
                 "grad_norm": max_rel(result.series("train/grad_norm", STEPS), norm),
                 "valid": max_rel(result.series("valid/loss", [0, ITERS]), ref.series("valid/loss", [0, ITERS]))}
        assert result.series("train/lr", STEPS) == ref.series("train/lr", STEPS), name
        table.append(f"{name:26s} " + "  ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        bad += [f"{name} {k} {v:.2e}" for k, v in diffs.items() if not v <= LAYOUT_TOL]
    print("\nmax relative difference to tp1-pp1 over 20 steps\n" + "\n".join(table))
    assert not bad, f"layouts off by more than {LAYOUT_TOL:g} relative: {bad}\n" + "\n".join(table)


@pytest.fixture(scope="module")
def clone_runs(runs) -> dict:
    return {name: runs[name] for name, growth in CLONES.items() if growth is not None}


@pytest.mark.parametrize("variant", CLONES)
def test_clone_starts_at_the_small_models_loss(variant, small, clone_runs, request):
    """The first logged train loss (step 1, before the update) and the step-0 valid loss equal the small
    model's own mean cross entropy on those batches: growth, slicing to TP2xPP2 and the loss preserve it."""
    runs = request.getfixturevalue("layout_runs") if CLONES[variant] is None else clone_runs
    result = runs[SAVED if CLONES[variant] is None else variant].check()
    batches = first_batches(ITERS if CLONES[variant] is None else 1)
    expected = {"train": hf_loss(small, batches["train"]), "valid": hf_loss(small, batches["valid"])}
    got = {"train": result.series("train/loss", [1])[0], "valid": result.series("valid/loss", [0])[0]}
    diffs = {k: rel(got[k], expected[k]) for k in got}
    print(f"\n{variant}: small {expected}, grown {got}, rel {diffs}")
    assert all(d <= CLONE_TOL for d in diffs.values()), (variant, expected, got, diffs)
    layers = 6 if "every:2" in (CLONES[variant] or []) else 4
    assert f"hidden 128, layers {layers}," in (result.job.out / "log.txt").read_text(), result.log_tail()


@pytest.fixture(scope="module")
def resumed_runs(runs) -> dict:
    return {name: (runs[f"{name}-stop"], runs[f"{name}-resume"]) for name in RESUMED}


@pytest.mark.parametrize("name", RESUMED)
def test_resume_continues_bit_for_bit(name, resumed_runs, layout_runs):
    full = layout_runs[name].check()
    stop, resume = resumed_runs[name]
    stop.check()
    assert resume is not None and resume.check()
    assert max(stop.steps) == STOP, f"{name}: the stopped run logged steps {sorted(stop.steps)}"
    after = STEPS[STOP:]
    assert sorted(s for s in resume.steps if "train/loss" in resume.steps[s]) == after, sorted(resume.steps)
    ckpt = stop.job.out.parent / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    assert zero_stage(ckpt / f"global_step{ITERS}") == RESUMED[name]
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        assert stop.series(key, STEPS[:STOP]) == full.series(key, STEPS[:STOP]), (name, key, "steps 1-10")
        got, want = resume.series(key, after), full.series(key, after)
        assert got == want, (name, key, [(s, g, w) for s, g, w in zip(after, got, want) if g != w])
    assert resume.series("valid/loss", [ITERS]) == full.series("valid/loss", [ITERS])


def test_exported_checkpoint_gives_the_trainers_valid_loss(layout_runs, tmp_path):
    """hyperclone export of the TP2xPP2 run's step-20 checkpoint, loaded by transformers, has the loss the
    trainer logged on validation batch 0 after step 20."""
    run = layout_runs[SAVED].check()
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "hyperclone_dist.cli.main", "export", str(run.job.out / "ckpt"),
                           "--out", str(out), "--format", "hf", "--no-progress"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained, initial = run.series("valid/loss", [ITERS, 0])
    got = hf_loss(out, first_batches(ITERS)["valid"])
    print(f"\nexported valid loss {got!r}, trainer {trained!r}, rel {rel(got, trained):.2e}")
    assert rel(got, trained) <= CLONE_TOL, (got, trained)
    assert trained < 0.95 * initial  # the export holds the trained weights, not the clone's


def test_a_deepspeed_launched_job_leaves_no_shared_memory(layout_runs):
    """On one CPU node the deepspeed launcher's ranks all-reduce through one shared-memory segment per rank
    (DeepSpeed's shm_comm op), which DeepSpeed never unlinks; the trainer removes the names once every rank
    has mapped them, so a finished job leaves nothing in /dev/shm."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder is not None and __compatible_ops__.get(builder.NAME), "no shm all-reduce here: nothing to test"
    job = layout_runs["tp2-pp2-zero1-deepspeed"].check().job
    left = sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{job.master_port}_*"))
    assert not left, f"left in {SHM_DIR} by the job: {[p.name for p in left]}"
