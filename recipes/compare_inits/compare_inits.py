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
    noisy 5-20 dB    noise scaled per layer (and 20-5 dB)
    symmetric noise-k  symmetric x2, gradient noise in the first 50 steps
    ... low-peak, grown-adam, ramp, mup: hand-offs (ARMS below), each with its small-continued control

Writes docs/results.md (mean ± spread over seeds; steps to the baseline's final loss; speedup counting
large-model steps only, as the paper does, and all-in, charging the small model's training compute) and
docs/figures/compare_inits{,_handoff}.png. ``--data``/``--tokenizer`` rerun it on any corpus.
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

from hyperclone_dist.experiments import (  # noqa: E402
    Curve,
    plot_curves,
    read_curve,
    run_pretrain,
    steps_to_reach,
    write_section,
)

PY = sys.executable
GROWN_ADAM = ["--clone-from", "{small_ckpt}", "--data-offset-steps", "{small_steps}"]  # moments, step, data stream
RAMP = "[[0, 5e-4], [100, 2e-3], [300, 2e-4]]"
RAMP_2X = "[[0, 1e-3], [100, 4e-3], [300, 4e-4]]"
ARMS = {
    "random": ["--init", "random", "--width-factor", "2"],
    "symmetric": ["--width-factor", "2", "--method", "symmetric"],
    "noisy": ["--width-factor", "2", "--method", "noisy", "--snr-db", "10"],
    "diagonal": ["--width-factor", "2", "--method", "diagonal"],
    "warmstart": ["--width-factor", "2", "--method", "warmstart", "--mup"],
    "depth": ["--insert-layers", "every:2"],
    "width+depth": ["--width-factor", "2", "--method", "noisy", "--insert-layers", "every:2"],
    "small-continued": ["--width-factor", "1"],
    # noise scaled per layer (SNR straight in dB from the first layer to the last)
    "noisy 5-20 dB": ["--width-factor", "2", "--method", "noisy", "--snr-db", "5", "--snr-db-last", "20"],
    "noisy 20-5 dB": ["--width-factor", "2", "--method", "noisy", "--snr-db", "20", "--snr-db-last", "5"],
    # symmetric clone, Gaussian noise on the gradients of the first 50 steps (std = 1 x each tensor's
    # gradient RMS): the copies part during the warmup, then train on plainly
    "symmetric noise-k": ["--width-factor", "2", "--method", "symmetric", "--symmetry-noise-steps", "50",
                          "--symmetry-noise-scale", "1"],
    # hand-off arms: a short warmup to a lower peak (3x the small model's final LR) instead of a re-warmup
    "noisy low-peak": ["--width-factor", "2", "--method", "noisy", "--snr-db", "10", "--handoff", "low-peak",
                       "--handoff-peak-factor", "3", "--lr-warmup-iters", "10"],
    "small-continued low-peak": ["--width-factor", "1", "--handoff", "low-peak", "--handoff-peak-factor", "3",
                                 "--lr-warmup-iters", "10"],
    # continue the small model's optimizer (Adam moments grown with the weights, step count carried), no
    # re-warmup, on the data the small model has not seen yet
    "noisy grown-adam": ["--clone-from", "{small_ckpt}", "--width-factor", "2", "--method", "noisy",
                         "--snr-db", "10", "--handoff", "no-rewarmup", "--lr", "1e-3", "--data-offset-steps",
                         "{small_steps}"],
    "small-continued grown-adam": ["--clone-from", "{small_ckpt}", "--width-factor", "1", "--handoff",
                                   "no-rewarmup", "--lr", "1e-3", "--data-offset-steps", "{small_steps}"],
    # the same, with muP's LR for the matrices whose fan-in grew (x 1/2): halved copies moved by the small
    # model's own Adam step would otherwise change the function twice as fast as that step did
    "noisy grown-adam mup": ["--clone-from", "{small_ckpt}", "--width-factor", "2", "--method", "noisy",
                             "--snr-db", "10", "--handoff", "no-rewarmup", "--lr", "1e-3", "--mup",
                             "--data-offset-steps", "{small_steps}"],
    # grown Adam with a ramp from a low LR back up to the baseline's peak (RAMP), with and without muP's LR
    # for the matrices whose fan-in grew; and the same ramp at twice the LR (RAMP_2X). muP changes nothing at
    # width 1, so each small-continued arm is the control of both clones on its schedule
    "noisy grown-adam ramp": [*GROWN_ADAM, "--width-factor", "2", "--method", "noisy", "--snr-db", "10",
                              "--lr-schedule-points", RAMP],
    "noisy grown-adam mup ramp": [*GROWN_ADAM, "--width-factor", "2", "--method", "noisy", "--snr-db", "10",
                                  "--mup", "--lr-schedule-points", RAMP],
    "small-continued grown-adam ramp": [*GROWN_ADAM, "--width-factor", "1", "--lr-schedule-points", RAMP],
    "noisy grown-adam mup ramp 2x": [*GROWN_ADAM, "--width-factor", "2", "--method", "noisy", "--snr-db", "10",
                                     "--mup", "--lr-schedule-points", RAMP_2X],
    "small-continued grown-adam ramp 2x": [*GROWN_ADAM, "--width-factor", "1", "--lr-schedule-points", RAMP_2X],
    "symmetric grown-adam mup": ["--clone-from", "{small_ckpt}", "--width-factor", "2", "--method", "symmetric",
                                 "--handoff", "no-rewarmup", "--lr", "1e-3", "--mup",
                                 "--data-offset-steps", "{small_steps}"],
}
INIT_ARMS = ("random", "symmetric", "noisy", "diagonal", "warmstart", "depth", "width+depth", "small-continued",
             "symmetric noise-k")
HANDOFF_ARMS = ("noisy", "small-continued", "noisy low-peak", "noisy grown-adam", "noisy grown-adam ramp",
                "noisy grown-adam mup ramp", "small-continued grown-adam ramp", "noisy grown-adam mup ramp 2x")
NEEDS_MOMENTS = {arm for arm, flags in ARMS.items() if "{small_ckpt}" in flags}


def flops_per_token(cfg_path: Path, seq: int) -> float:
    from hyperclone_dist.sources import open_source
    from hyperclone_dist.train.monitor import flops_per_token as fpt

    return fpt(open_source(cfg_path).config, seq)


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
    from hyperclone_dist.train.moments import has_moments

    wants_moments = bool(NEEDS_MOMENTS & set(args.arms)) and not has_moments(out / "small")
    if args.small and wants_moments:
        raise SystemExit("compare_inits: the grown-adam arms need the small model's pretrain.py checkpoint "
                         "(with its Adam moments); leave out --small or those arms")
    if not args.small and (not small.is_file() or wants_moments):
        print(f"training the small model ({args.small_steps} steps) ...", flush=True)
        run_pretrain(["--init", "random", "--model-config", "configs/models/llama-tiny.json", "--train-iters",
                      args.small_steps, "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "40", *common,
                      "--seed", 0, "--save", out / "small", "--save-moments"], env, out / "small.log",
                     "compare_inits", REPO)
        subprocess.run([PY, "-m", "hyperclone_dist.cli.main", "export", out / "small", "--format", "small.pt",
                        "--out", small, "--overwrite"], cwd=REPO, env=env, check=True, capture_output=True)
    jobs = []
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = out / f"{arm.replace(' ', '_')}-seed{seed}"
            if (run_dir / "done").is_file():
                continue
            arm_flags = [str(f).format(small_ckpt=out / "small", small_steps=args.small_steps) for f in ARMS[arm]]
            flags = ["--clone-from", small, "--train-iters", args.steps, "--lr", args.lr, "--min-lr", args.lr / 10,
                     "--lr-warmup-iters", args.warmup, *common, "--seed", seed, "--metrics-file",
                     run_dir / "metrics.jsonl", "--symmetry-interval", args.eval_interval, *arm_flags]
            jobs.append((arm, seed, run_dir, flags))
    jobs.sort(key=lambda job: job[1])  # seed by seed: a partial run already has whole seeds to report

    def work(job):
        arm, seed, run_dir, flags = job
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        run_pretrain(flags, env, run_dir / "log.txt", "compare_inits", REPO)
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


def _run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm.replace(' ', '_')}-seed{seed}"


def _steps(values: list[int | None]) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "never"
    text = _spread([float(v) for v in reached]).replace(".000", "")
    if all(v == 0 for v in reached):
        text = "0 (starts below)"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)})"


def report(args, out: Path, small: Path) -> None:
    arms = [a for a in args.arms if all((_run_dir(out, a, s) / "done").is_file() for s in args.seeds)]
    curves = {arm: [read_curve(_run_dir(out, arm, s) / "metrics.jsonl", label=arm) for s in args.seeds]
              for arm in arms}
    baseline = {s: curves["random"][i].final for i, s in enumerate(args.seeds)}
    control = {s: curves["small-continued"][i].final for i, s in enumerate(args.seeds)} \
        if "small-continued" in curves else None
    small_state = json.loads(next((out / "small").glob("global_step*/trainer_state.json")).read_text())
    from hyperclone_dist.growth.grow import Grower
    from hyperclone_dist.growth.spec import GrowthSpec
    from hyperclone_dist.sources import open_source
    from hyperclone_dist.train.monitor import flops_per_token as fpt

    small_cfg = open_source(small).config
    charge = small_state["step"] * fpt(small_cfg, 128) / fpt(
        Grower(small_cfg, GrowthSpec(width_factor=2), lambda n: None).large, 128)  # in large-model steps
    rows = []
    for arm, runs in curves.items():
        reach = [steps_to_reach(c, baseline[s]) for c, s in zip(runs, args.seeds)]
        reach_control = [steps_to_reach(c, control[s]) for c, s in zip(runs, args.seeds)] if control else []
        vs_control = [c.final - control[s] for c, s in zip(runs, args.seeds)] if control else []
        rise = [max(0.0, (max(c.losses) - c.losses[0]) / c.losses[0]) for c in runs]
        reached = [r for r in reach if r is not None]
        if arm == "random":
            speed, all_in = "1", "—"
        elif reached and all(r == 0 for r in reached):
            speed = "starts below"
            all_in = f"{args.steps / charge:.2f}"  # the whole cost is the small model's training
        elif reached:
            speed = _spread([args.steps / r for r in reached])
            all_in = _spread([args.steps / (r + charge) for r in reached])
        else:
            speed = all_in = "—"
        sym = []
        for s in args.seeds:
            lines = (_run_dir(out, arm, s) / "metrics.jsonl").read_text().splitlines()
            cos = [json.loads(line)["symmetry/min_cosine"] for line in lines if "symmetry/min_cosine" in line]
            if cos:
                sym.append(cos[-1])
        rows.append((arm, _spread([c.losses[0] for c in runs]), _spread([c.final for c in runs]),
                     _spread(vs_control) if vs_control else "—", _steps(reach), speed, all_in,
                     _steps(reach_control) if control else "—", f"{100 * max(rise):.1f}%",
                     _spread(sym) if sym else "—"))
    mean_curves = [Curve(arm, runs[0].steps, [statistics.mean(c.losses[i] for c in runs)
                                              for i in range(len(runs[0].steps))]) for arm, runs in curves.items()]
    target = statistics.mean(baseline.values())
    figures = []
    for suffix, title, wanted in (("", "inits", INIT_ARMS), ("_handoff", "hand-offs", HANDOFF_ARMS)):
        shown = [c for c in mean_curves if c.label in wanted]
        if shown:
            figures.append(plot_curves(shown, REPO / "docs" / "figures" / f"compare_inits{suffix}.png",
                                       f"{title}, mean of {len(args.seeds)} seeds (CPU, d=64 -> 128)",
                                       hline=(target, "random baseline's final loss")))
    header = ("| arm | valid loss, step 0 | final valid loss | final − control | steps to baseline's final | "
              "speedup (large steps) | speedup (all-in) | steps to control's final | worst rise | "
              "min cosine of copies |")
    table = "\n".join([header, "|" + "---|" * 10] + ["| " + " | ".join(row) + " |" for row in rows])
    body = (f"## Every init on the same budget (`recipes/compare_inits`)\n\nRun on {time.strftime('%Y-%m-%d')}, "
            f"2-core CPU, float32, embedded corpus (90/10 split by documents). Small model: Llama-style d=64, "
            f"4 layers, vocab 512, trained {small_state['step']} steps (peak LR 3e-3, cosine to 3e-4); every large "
            f"arm: d=128 (x2 width) unless named, {args.steps} steps, peak LR {args.lr}, warmup {args.warmup}, cosine "
            f"to LR/10 (hand-off arms override the schedule), global batch 16 x 128 tokens; seeds {args.seeds} "
            f"(data order and growth noise). Mean ± standard deviation over seeds. 'control' is small-continued: the "
            f"small model trained on for the same steps and schedule. 'final − control' is paired per seed. "
            f"All-in speedup charges the small model's {small_state['step']} steps at its FLOPs per token "
            f"(= {charge:.0f} large-model steps). Worst rise: the largest validation loss above step 0, over seeds.\n\n"
            f"```bash\n.venv/bin/python recipes/compare_inits/compare_inits.py --seeds "
            f"{' '.join(map(str, args.seeds))} --steps {args.steps}\n```\n\n{table}\n\n"
            + "".join(f"![mean validation loss per arm](figures/{png.name})\n" for png in figures))
    results = write_section(REPO / args.results, "## Every init on the same budget", body)
    print(table)
    print(f"wrote {results} and {', '.join(map(str, figures))}")


if __name__ == "__main__":
    sys.exit(main())
