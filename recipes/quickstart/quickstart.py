"""The quickstart: grow a small model that was trained here into a 2x wider one, straight into a
TP=2 x PP=2 DeepSpeed run, and race it against a random-init model of the same shape.

    bash recipes/quickstart/run.sh            # sets up .venv/ first; outputs under runs/quickstart/

Steps (each a real command a user would type; the output shows them):
1. train the small model (random init, Llama-style, d=64, 4 layers) on the embedded corpus (Python's
   standard library sources, tokenized with a sentencepiece model trained here), one process;
2. export it to small.pt (`hyperclone export`);
3. `deepspeed --num_gpus 4 launch/pretrain.py --clone-from small.pt --width-factor 2 --tp 2 --pp 2`
   (4 CPU ranks), first checking that the clone's step-0 validation loss equals the small model's;
4. the same command with `--init random`: the baseline of the same large shape, same steps and settings;
5. the table (steps to reach the baseline's final validation loss, final losses) and a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hyperclone_dist.experiments import plot_curves, read_curve, steps_to_reach  # noqa: E402

PY = Path(sys.executable)
DEEPSPEED = PY.with_name("deepspeed")
COMMON = ["--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "16", "--split", "90,10,0",
          "--eval-iters", "4", "--weight-decay", "0.1", "--clip-grad", "1.0", "--no-progress"]


def run(cmd: list[str], label: str, env: dict) -> None:
    shown = " ".join(str(c) for c in cmd).replace(str(REPO) + "/", "")
    print(f"\n[{time.strftime('%H:%M:%S')}] {label}\n  $ {shown}", flush=True)
    start = time.time()
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, text=True, capture_output=True)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if line.startswith(("pretrain", "wrote", "saved", "hyperclone")) and "Warning" not in line]
    for line in lines[-4:]:
        print(f"  {line}")
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"quickstart: step failed ({label}), exit {proc.returncode}")
    print(f"  done in {time.time() - start:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--small-steps", type=int, default=300)
    parser.add_argument("--large-steps", type=int, default=200)
    parser.add_argument("--eval-interval", type=int, default=20)
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline",
           "HYPERCLONE_CACHE": os.environ.get("HYPERCLONE_CACHE", str(REPO / ".cache" / "hyperclone"))}
    evals = ["--eval-interval", str(args.eval_interval)]
    started = time.time()

    run([PY, "launch/pretrain.py", "--init", "random", "--model-config", "configs/models/llama-tiny.json",
         "--train-iters", args.small_steps, "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "30",
         *COMMON, *evals, "--save", out / "small"], "1. train the small model (d=64, 4 layers, 1 process)", env)
    run([PY, "-m", "hyperclone_dist.cli.main", "export", out / "small", "--format", "small.pt",
         "--out", out / "small.pt"], "2. export it to small.pt", env)
    large = ["--tp", "2", "--pp", "2", "--deepspeed_config", "configs/deepspeed/zero1.json",
             "--train-iters", args.large_steps, "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "20",
             *COMMON, *evals]
    run([DEEPSPEED, "--num_gpus", "4", "launch/pretrain.py", "--clone-from", out / "small.pt",
         "--width-factor", "2", "--method", "noisy", *large, "--save", out / "cloned"],
        "3. grow x2 (d=128) straight into TP=2 x PP=2 and continue training (deepspeed, 4 ranks)", env)
    run([DEEPSPEED, "--num_gpus", "4", "launch/pretrain.py", "--init", "random", "--clone-from", out / "small.pt",
         "--width-factor", "2", *large, "--save", out / "random"],
        "4. baseline: random init of the same large shape, same steps and settings", env)

    small = read_curve(out / "small" / "metrics.jsonl", label="small model (d=64)")
    cloned = read_curve(out / "cloned" / "metrics.jsonl", label="HyperCloning x2 (noisy)")
    random = read_curve(out / "random" / "metrics.jsonl", label="random init (d=128)")
    target = random.final
    print(f"\nsmall model final validation loss {small.final:.4f}; cloned run at step 0: {cloned.losses[0]:.4f} "
          f"(|diff| {abs(cloned.losses[0] - small.final):.1e}: the grown model computes the small one's function)")
    header = f"{'run':<28} {'valid loss @0':>13} {'final valid loss':>16} {'steps to ' + format(target, '.3f'):>15}"
    print("\n" + header + "\n" + "-" * len(header))
    for curve in (random, cloned):
        reached = steps_to_reach(curve, target)
        print(f"{curve.label:<28} {curve.losses[0]:>13.4f} {curve.final:>16.4f} "
              f"{(str(reached) if reached is not None else 'not reached'):>15}")
    reached = steps_to_reach(cloned, target)
    if reached:
        print(f"\nthe clone reached the baseline's final loss in {reached} of {random.steps[-1]} steps: "
              f"{random.steps[-1] / max(reached, 1):.1f}x fewer large-model steps")
    if small.final <= target:  # the usual case at the quickstart's short budget
        print(f"\nthe baseline ends above the small model's own loss ({target:.3f} > {small.final:.3f}): this shows "
              f"that the clone keeps the small model's function and head start, not that the wider model learns "
              f"faster; for that see docs/results.md, 'Long budgets'")
    png = plot_curves([random, cloned], out / "loss_curves.png", "quickstart: x2 growth vs random init (CPU)",
                      hline=(target, "baseline's final loss"))
    print(f"loss curves: {png}\nall outputs: {out}  ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
