"""Does growing pay once the budget is long enough for training from scratch to pass the small model?

    .venv/bin/python recipes/long_budget/run.py                  # the study in docs/results.md
    .venv/bin/python recipes/long_budget/run.py --report-only    # rewrite the section from runs/long_budget

Runs already finished under --out are kept, so the command resumes; the whole plan (TIERS) is ~25k large
steps, about 1.5 h on 2 busy CPU cores.

compare_inits races every init for 300 steps, where the random baseline is still above the small model's own
loss, so every clone "reaches" it at step 0. Here the budgets are long enough for the baseline to pass the
small model, on a corpus that no run repeats (corpus.py). Two small models (d=64, trained for each of
--small-steps) are grown x2 (d=128); every arm trains for each large budget with a cosine schedule of that
length unless its hand-off says otherwise (ARMS), and the decisive budget is repeated over --seeds. The
report (report.py) gives steps to the baseline's final loss and to its loss at 1/4, 1/2 and 3/4 of its
budget, speedups in large-model steps and all-in, and paired differences per seed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from corpus import build, token_count  # noqa: E402
from report import report  # noqa: E402

from hyperclone_dist.experiments import run_pretrain  # noqa: E402

PY = sys.executable
GROWN = ["--clone-from", "{ckpt}", "--data-offset-steps", "{small}"]  # grown Adam, step count, data stream
# grown Adam: a ramp from ~the small model's final LR back to the peak, decayed by half the budget, then flat
FAST = "[[0, 5e-4], [{ramp}, 2e-3], [{half}, 2e-4], [{budget}, 2e-4]]"
NOISY = ["--width-factor", "2", "--method", "noisy", "--snr-db", "10"]
LEMON = ["--lr-decay-iters", "{two_thirds}"]  # keep the peak, decay by 2/3 of the budget, then stay at the floor
WSD = ["--handoff", "no-rewarmup", "--lr", "1e-3", "--lr-decay-style", "wsd", "--lr-wsd-decay-fraction", "0.2"]
# arm -> (flags, its same-schedule control); every arm is also compared with random
ARMS = {
    "random": (["--init", "random", "--width-factor", "2"], None),
    "noisy": (NOISY, "small-continued"),  # the paper's protocol: fresh Adam, re-warmup to the peak, cosine
    "small-continued": (["--width-factor", "1"], None),
    "noisy 0 dB": (["--width-factor", "2", "--method", "noisy", "--snr-db", "0"], "small-continued"),
    "noisy lemon": ([*NOISY, *LEMON], "small-continued lemon"),
    "small-continued lemon": (["--width-factor", "1", *LEMON], None),
    "noisy grown-adam wsd": ([*GROWN, *NOISY, *WSD], "small-continued grown-adam wsd"),
    "small-continued grown-adam wsd": ([*GROWN, "--width-factor", "1", *WSD], None),
    "noisy grown-adam fast": ([*GROWN, *NOISY, "--lr-schedule-points", FAST], "small-continued grown-adam fast"),
    # muP's LR (x 1/2) on the matrices whose fan-in grew: a per-group LR for what growth added
    "noisy grown-adam mup fast": ([*GROWN, *NOISY, "--mup", "--lr-schedule-points", FAST],
                                  "small-continued grown-adam fast"),
    "small-continued grown-adam fast": ([*GROWN, "--width-factor", "1", "--lr-schedule-points", FAST], None),
}
# (budgets, seeds, small models, arms) in priority order, so that a study cut short still has whole
# comparisons: the decisive budget's arms with their controls first, then its other seeds, the scan last
TIERS = (
    ("decisive", "first", "first", ("random", "noisy", "small-continued", "noisy grown-adam fast",
                                    "small-continued grown-adam fast")),
    ("decisive", "all", "first", ("noisy lemon", "small-continued lemon")),
    ("decisive", "rest", "first", ("noisy", "small-continued")),
    ("decisive", "first", "first", ("noisy grown-adam mup fast", "noisy 0 dB", "noisy grown-adam wsd",
                                    "small-continued grown-adam wsd")),
    ("decisive", "rest", "first", ("random",)),
    ("shorter", "first", "first", ("random", "noisy", "noisy lemon")),
    ("decisive", "rest", "first", ("noisy 0 dB",)),
    ("longer", "first", "rest", ("noisy",)),
    ("longer", "first", "first", ("random", "noisy")),
    ("decisive", "first", "rest", ("noisy", "small-continued")),
    ("decisive", "rest", "first", ("noisy grown-adam fast", "small-continued grown-adam fast")),
    ("longer", "first", "all", ("noisy lemon",)),
)
SMOKE = dict(small_steps=[10], budgets=[10, 20], decisive=20, seeds=[0], eval_interval=5, corpus_docs=200,
             arms=["random", "noisy grown-adam fast", "small-continued grown-adam fast"])  # 6 runs, ~30 s


def warmup(steps: int) -> int:
    return min(40, steps // 4)  # 40 steps, as compare_inits; shorter only in the smoke run


def run_name(arm: str, small: int | None, budget: int, seed: int) -> str:
    where = f"B{budget}" if small is None else f"S{small}-B{budget}"  # random does not depend on the small model
    return f"{where}-{arm.replace(' ', '_')}-seed{seed}"


def plan(args) -> list[tuple[str | None, int | None, int, int]]:
    """(arm, small steps, budget, seed) in priority order: the decisive budget's first seed, its other seeds,
    then the scan, so a study cut short still has whole comparisons to report."""
    budgets = {"decisive": [args.decisive], "shorter": [b for b in args.budgets if b < args.decisive],
               "longer": [b for b in args.budgets if b > args.decisive]}
    split = lambda items: {"first": items[:1], "rest": items[1:], "all": items}
    seeds, smalls = split(args.seeds), split(args.small_steps)
    jobs = [(arm, small, budget, seed) for which, seed_set, small_set, arms in TIERS for budget in budgets[which]
            for seed in seeds[seed_set] for small in smalls[small_set] for arm in arms if arm in args.arms]
    seen, out = set(), []
    for arm, small, budget, seed in jobs:
        key = (arm, None if arm == "random" else small, budget, seed)
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/long_budget")
    p.add_argument("--small-steps", type=int, nargs="+", default=[400, 1000], help="small models' lengths")
    p.add_argument("--budgets", type=int, nargs="+", default=[300, 600, 1200], help="large-model steps")
    p.add_argument("--decisive", type=int, default=600, help="the budget repeated over every seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--results", default="docs/results.md")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--report-only", action="store_true", help="no training: report what is in --out")
    p.add_argument("--smoke", action="store_true", help="a tiny version of everything (the test suite's)")
    args = p.parse_args()
    args.corpus_docs = None
    if args.smoke:
        vars(args).update(SMOKE)
    out = (REPO / args.out).resolve()
    prefix = build(out / "corpus", limit=args.corpus_docs)
    args.corpus_tokens = token_count(prefix)
    if not args.report_only:
        train(args, out, prefix)
    report(args, out)
    return 0


def train(args, out: Path, prefix: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    common = ["--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "16", "--split", "90,10,0",
              "--eval-iters", "8", "--eval-interval", args.eval_interval, "--weight-decay", "0.1",
              "--clip-grad", "1.0", "--log-interval", args.eval_interval, "--data-path", prefix,
              "--tokenizer-model", prefix.parent / "tok.model", "--data-cache-path", out / "data_cache"]
    started = time.time()

    locks = {steps: threading.Lock() for steps in args.small_steps}

    def small_model(steps: int) -> None:
        """Train (once) and export the small model a job grows; a second job needing it waits for the first."""
        with locks[steps]:
            if (out / f"small-{steps}.pt").is_file():
                return
            run_pretrain(["--init", "random", "--model-config", "configs/models/llama-tiny.json", "--train-iters",
                          steps, "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", warmup(steps), *common,
                          "--seed", 0, "--save", out / f"small-{steps}", "--save-moments"], env,
                         out / f"small-{steps}.log", "long_budget", REPO)
            subprocess.run([PY, "-m", "hyperclone_dist.cli.main", "export", out / f"small-{steps}", "--format",
                            "small.pt", "--out", out / f"small-{steps}.pt", "--overwrite"], cwd=REPO, env=env,
                           check=True, capture_output=True)
            print(f"  small model, {steps} steps, done ({(time.time() - started) / 60:.1f} min)", flush=True)

    def work(job):
        arm, small, budget, seed = job
        run_dir = out / run_name(arm, small, budget, seed)
        if (run_dir / "done").is_file():
            return
        source = small or args.small_steps[0]  # random takes only the shape from it
        small_model(source)
        fill = dict(ckpt=out / f"small-{source}", small=source, budget=budget, half=budget // 2,
                    two_thirds=2 * budget // 3,
                    ramp=100 if budget // 2 > 100 else budget // 4)  # 100 steps up, unless the budget is tiny
        flags = ["--clone-from", out / f"small-{source}.pt", "--train-iters", budget, "--lr", "2e-3",
                 "--min-lr", "2e-4", "--lr-warmup-iters", warmup(budget), *common, "--seed", seed, "--metrics-file",
                 run_dir / "metrics.jsonl", *[str(f).format(**fill) for f in ARMS[arm][0]]]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        run_pretrain(flags, env, run_dir / "log.txt", "long_budget", REPO)
        (run_dir / "done").write_text("ok\n")
        print(f"  {run_dir.name} done ({(time.time() - started) / 60:.1f} min)", flush=True)

    jobs = plan(args)
    print(f"{len(jobs)} runs, {args.parallel} at a time ...", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(work, jobs))


if __name__ == "__main__":
    sys.exit(main())
