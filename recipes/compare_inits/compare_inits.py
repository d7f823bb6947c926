"""Every way to start the large model, raced on the same data: which reaches the random-init baseline's
final validation loss first, and is it the width or just the small model's head start?

    .venv/bin/python recipes/compare_inits/compare_inits.py [--seeds 0 1 2] [--data PREFIX --tokenizer X.model]

One small model is trained first (or given with --small); then for each seed every arm trains for the same
number of large-model steps with the same hyperparameters (the paper's protocol):

    random           random init of the large shape (the baseline)
    symmetric        HyperCloning x2, symmetric
    noisy            HyperCloning x2, noisy 10 dB
    diagonal         HyperCloning x2, diagonal
    warmstart        muP warmstart x2 (shrink 0.5, perturb 1.0) with muP LR multipliers
    depth            identity layers after every 2nd layer (width unchanged)
    width+depth      noisy x2 and identity layers
    small-continued  the control: the small model itself, trained on for the same steps

Writes docs/results.md (mean ± spread over seeds; steps to the baseline's final loss; speedup counting
large-model steps only, as the paper does, and all-in, charging the small model's training compute) and
docs/figures/compare_inits.png. ``--data``/``--tokenizer`` rerun it on any corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hyperclone_dist.experiments import Curve, plot_curves, read_curve, steps_to_reach  # noqa: E402

PY = sys.executable
ARMS = {
    "random": ["--init", "random", "--width-factor", "2"],
    "symmetric": ["--width-factor", "2", "--method", "symmetric"],
    "noisy": ["--width-factor", "2", "--method", "noisy", "--snr-db", "10"],
    "diagonal": ["--width-factor", "2", "--method", "diagonal"],
    "warmstart": ["--width-factor", "2", "--method", "warmstart", "--mup"],
    "depth": ["--insert-layers", "every:2"],
    "width+depth": ["--width-factor", "2", "--method", "noisy", "--insert-layers", "every:2"],
    "small-continued": ["--width-factor", "1"],
}


def pretrain(flags: list, env: dict, log: Path) -> None:
    cmd = [PY, "launch/pretrain.py", "--no-progress", *map(str, flags)]
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"compare_inits: {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")


def flops_per_token(cfg_path: Path, seq: int) -> float:
    from hyperclone_dist.checkpoint.reader import SourceCheckpoint
    from hyperclone_dist.train.monitor import flops_per_token as fpt

    return fpt(SourceCheckpoint(cfg_path).config, seq)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/compare_inits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--small", help="a trained small model (small.pt / HF dir); default: train one here")
    p.add_argument("--small-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=400, help="large-model steps of every arm")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--data", nargs="+", help="--data-path of pretrain.py (default: the embedded corpus)")
    p.add_argument("--tokenizer", help="--tokenizer-model for --data")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one process each)")
    p.add_argument("--results", default="docs/results.md")
    args = p.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline",
           "HYPERCLONE_CACHE": os.environ.get("HYPERCLONE_CACHE", str(REPO / ".cache" / "hyperclone"))}
    data = (["--data-path", *args.data, "--tokenizer-model", args.tokenizer] if args.data else [])
    common = ["--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "16", "--split", "90,10,0",
              "--eval-iters", "8", "--eval-interval", args.eval_interval, "--weight-decay", "0.1",
              "--clip-grad", "1.0", "--log-interval", "25", *data]
    started = time.time()
    small = Path(args.small) if args.small else out / "small.pt"
    if not args.small and not small.is_file():
        print(f"training the small model ({args.small_steps} steps) ...", flush=True)
        pretrain(["--init", "random", "--model-config", "configs/models/llama-tiny.json", "--train-iters",
                  args.small_steps, "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "40", *common,
                  "--seed", 0, "--save", out / "small"], env, out / "small.log")
        subprocess.run([PY, "-m", "hyperclone_dist.cli.main", "export", out / "small", "--format", "small.pt",
                        "--out", small, "--overwrite"], cwd=REPO, env=env, check=True, capture_output=True)
    jobs = []
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = out / f"{arm}-seed{seed}"
            if (run_dir / "done").is_file():
                continue
            flags = ["--clone-from", small, *ARMS[arm], "--train-iters", args.steps, "--lr", args.lr,
                     "--min-lr", args.lr / 10, "--lr-warmup-iters", args.warmup, *common, "--seed", seed,
                     "--metrics-file", run_dir / "metrics.jsonl", "--symmetry-interval", args.eval_interval]
            jobs.append((arm, seed, run_dir, flags))

    def work(job):
        arm, seed, run_dir, flags = job
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        pretrain(flags, env, run_dir / "log.txt")
        (run_dir / "done").write_text("ok\n")
        print(f"  {arm} seed {seed} done ({(time.time() - started) / 60:.1f} min)", flush=True)

    print(f"{len(jobs)} runs, {args.parallel} at a time ...", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(work, jobs))
    report(args, out, small)
    return 0


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def report(args, out: Path, small: Path) -> None:
    curves = {arm: [read_curve(out / f"{arm}-seed{s}" / "metrics.jsonl", label=arm) for s in args.seeds]
              for arm in args.arms}
    targets = {s: curves["random"][i].final for i, s in enumerate(args.seeds)} if "random" in curves else None
    small_state = json.loads(next((out / "small").glob("global_step*/trainer_state.json")).read_text()) \
        if (out / "small").is_dir() else None
    small_flops = large_flops = None
    small_steps = small_state["step"] if small_state else None
    if small_steps:
        small_flops = flops_per_token(small, 128)
        from hyperclone_dist.growth.grow import Grower
        from hyperclone_dist.growth.spec import GrowthSpec
        from hyperclone_dist.checkpoint.reader import SourceCheckpoint
        from hyperclone_dist.train.monitor import flops_per_token as fpt

        large_flops = fpt(Grower(SourceCheckpoint(small).config, GrowthSpec(width_factor=2), lambda n: None).large, 128)
    rows = []
    for arm, runs in curves.items():
        finals = [c.final for c in runs]
        start = [c.losses[0] for c in runs]
        rise = [max(0.0, (max(c.losses) - c.losses[0]) / c.losses[0]) for c in runs]
        reach = [steps_to_reach(c, targets[s]) for c, s in zip(runs, args.seeds)] if targets else []
        reached = [r for r in reach if r is not None]
        speedup = [args.steps / max(r, 1) for r in reached]
        all_in = []
        if small_flops and reached:
            charge = small_steps * small_flops / large_flops  # small-model steps in large-step units
            all_in = [args.steps / (r + charge) for r in reached] if arm != "random" else []
        sym = []
        for s in args.seeds:
            lines = [json.loads(line) for line in (out / f"{arm}-seed{s}" / "metrics.jsonl").read_text().splitlines()]
            cos = [line["symmetry/min_cosine"] for line in lines if "symmetry/min_cosine" in line]
            if cos:
                sym.append(cos[-1])
        rows.append((arm, _spread(start), _spread(finals), f"{len(reached)}/{len(runs)}",
                     _spread([float(r) for r in reached]), _spread(speedup),
                     _spread(all_in) if arm != "random" else "—", _spread(rise), _spread(sym) if sym else "—"))
    mean_curves = []
    for arm, runs in curves.items():
        steps = runs[0].steps
        mean_curves.append(Curve(arm, steps, [statistics.mean(c.losses[i] for c in runs) for i in range(len(steps))]))
    target = statistics.mean(targets.values()) if targets else None
    png = plot_curves(mean_curves, REPO / "docs" / "figures" / "compare_inits.png",
                      f"every init, mean of {len(args.seeds)} seeds (CPU, d=64 -> 128)",
                      hline=(target, "random baseline's final loss") if target else None)
    header = ("| arm | valid loss at step 0 | final valid loss | reached target | steps to target | speedup "
              "(large steps) | speedup (all-in) | worst rise above step 0 | final min cosine of copies |")
    lines = [header, "|" + "---|" * 9]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines)
    results = REPO / args.results
    body = (f"## Every init on the same budget (`recipes/compare_inits`)\n\nRun on {time.strftime('%Y-%m-%d')}, "
            f"2-core CPU, float32. Small model: Llama-style d=64, 4 layers, vocab 512, trained {small_steps} steps; "
            f"large arms d=128 (x2 width), {args.steps} steps each, peak LR {args.lr}, warmup {args.warmup}, cosine "
            f"to LR/10, global batch 16 x 128 tokens; seeds {args.seeds} (data order and growth noise). Target: "
            f"each seed's random baseline's final validation loss (mean {target:.3f}). Spread: ± one standard "
            f"deviation over seeds. All-in speedup charges the small model's training at its FLOPs per token.\n\n"
            f"```bash\n.venv/bin/python recipes/compare_inits/compare_inits.py --seeds {' '.join(map(str, args.seeds))} "
            f"--steps {args.steps}\n```\n\n{text}\n\n![mean validation loss per arm](figures/{png.name})\n")
    results.write_text("# Results\n\n" + body)
    print(text)
    print(f"wrote {results} and {png}")


if __name__ == "__main__":
    sys.exit(main())
