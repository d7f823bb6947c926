"""The paper's race at GPU scale: a 101M Llama trained here, grown x2 to 352M (bf16, sequence 1024), against
a random init of the 352M shape for the same steps; records the speedup and MFU in docs/results.md.

    bash recipes/gpu-100m-to-350m/submit.sh            # one node, every GPU it has (about an hour on one H100)
    .venv/bin/python recipes/gpu-100m-to-350m/run.py --gpus 8 --steps 3000 [--input my-corpus/ ...]

Steps, each a pretrain.py or hyperclone command (printed as it runs):
1. corpus: a sentencepiece tokenizer (vocab 16384) and megatron indexed data from --input, by default the
   Python sources of the packages this project installs (torch, transformers, deepspeed, megatron-core:
   ~110 MB of text, nothing downloaded). That is ~30M tokens: the large arms see it about 3 times, so bring
   a real corpus with --input for numbers that mean more than "the clone gets there first";
2. the small model (configs/models/llama-100m.json) for --small-steps, saved with its Adam moments;
3. the arms, each --steps large-model steps on the same data and hyperparameters (recipes/.../train.json):
       random                 random init of the 352M shape (the baseline)
       noisy                  HyperCloning x2, noisy 10 dB, the paper's re-warmup schedule
       noisy grown-adam mup   the same clone continuing the small model's optimizer (docs/pretraining.md)
       small-continued        the control: the small model trained on for the same steps
4. the table (steps to the baseline's final validation loss, speedup in large-model steps and all-in, worst
   rise above step 0, median MFU) into docs/results.md with the date and GPU, and the curves as a PNG.

``--smoke`` runs the same pipeline with a tiny model for a few steps in float32 on CPU (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hyperclone_dist.experiments import plot_curves, read_curve, steps_to_reach, write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
PY = Path(sys.executable)
TORCHRUN = PY.with_name("torchrun")
INSTALLED_SOURCES = ("torch", "transformers", "deepspeed", "megatron")
SECTION = "## GPU: ~100M grown to ~350M"
ARMS = {
    "random": ["--init", "random"],
    "noisy": [],
    "noisy grown-adam mup": ["--clone-from", "{small_ckpt}", "--mup", "--lr-schedule-points", "{ramp}",
                             "--data-offset-steps", "{small_steps}"],
    "small-continued": ["--width-factor", "1"],
}
SMOKE = {  # a tiny stand-in for every size, so CI runs the whole pipeline on CPU in under a minute
    "vocab": 512, "small_model": "configs/models/llama-tiny.json", "seq": 128, "micro": 4, "global": 8,
    "eval_iters": 2, "warmup": 2, "deepspeed_config": "configs/deepspeed/zero1.json", "corpus_mb": 1.0,
}


def run(cmd: list, label: str, env: dict, log: Path) -> None:
    cmd = [str(c) for c in cmd]
    print(f"\n[{time.strftime('%H:%M:%S')}] {label}\n  $ {' '.join(cmd).replace(str(REPO) + '/', '')}", flush=True)
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit("\n".join(tail) + f"\ngpu recipe: {label} failed (exit {proc.returncode}); see {log}")
    print(f"  done in {time.time() - started:.0f} s (log: {log})", flush=True)


def default_inputs() -> list[str]:
    site = Path(sysconfig.get_paths()["purelib"])
    return [str(site / name / "**" / "*.py") for name in INSTALLED_SOURCES if (site / name).is_dir()]


def arm_flags(arm: str, args, small_ckpt: Path) -> list[str]:
    # the grown-adam arm starts at the small model's final LR with muP's 1/width on the matrices whose fan-in
    # grew (so its first steps move the function as the small model's own next steps would: no bump) and
    # ramps to the baseline's peak over the first third, then decays like every other arm
    ramp = json.dumps([[0, args.small_min_lr], [args.steps // 3, 2 * args.lr], [args.steps, args.lr / 5]])
    values = {"small_ckpt": small_ckpt, "small_steps": args.small_steps, "ramp": ramp}
    return [str(f).format(**values) for f in ARMS[arm]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu-100m-to-350m")
    p.add_argument("--gpus", type=int, default=None, help="processes (default: every visible GPU)")
    p.add_argument("--small-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=3000, help="large-model steps of every arm")
    p.add_argument("--lr", type=float, default=6e-4, help="the large arms' peak LR")
    p.add_argument("--small-lr", type=float, default=1e-3)
    p.add_argument("--small-min-lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--input", action="append", help="corpus files/dirs/globs (default: installed Python sources)")
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--results", default="docs/results.md")
    p.add_argument("--figure", help="the loss curves' PNG (default: docs/figures/gpu_100m_to_350m.png, or the run "
                                    "folder with --smoke); a shortened run keeps the published figure")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, float32 on CPU: checks the pipeline")
    args = p.parse_args(argv)
    if args.smoke:
        args.small_steps, args.steps, args.eval_interval = min(args.small_steps, 8), min(args.steps, 6), 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if gpu is None and not args.smoke:
        raise SystemExit("gpu recipe: no GPU visible (run with --smoke to check the pipeline on CPU)")
    gpus = args.gpus or (torch.cuda.device_count() if gpu else 1)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
           "HYPERCLONE_CACHE": os.environ.get("HYPERCLONE_CACHE", str(REPO / ".cache" / "hyperclone"))}
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"

    config = json.loads((HERE / "train.json").read_text())
    small_model = SMOKE["small_model"] if args.smoke else config["model_config"]
    vocab = SMOKE["vocab"] if args.smoke else json.loads((REPO / small_model).read_text())["vocab_size"]
    data = out / "data"
    data.mkdir(exist_ok=True)
    inputs = ([] if args.smoke else [f for item in (args.input or default_inputs()) for f in ("--input", item)])
    corpus = ["--default-corpus-mb", SMOKE["corpus_mb"]] if args.smoke else inputs
    hyperclone = [PY, "-m", "hyperclone_dist.cli.main"]
    if not (data / "tok.model").is_file():
        run([*hyperclone, "data", "tokenizer", *corpus, "--vocab-size", vocab, "--out", data / "tok"],
            f"1a. tokenizer (vocab {vocab})", env, out / "tokenizer.log")
    if not (data / "corpus.idx").is_file():
        run([*hyperclone, "data", "prepare", *corpus, "--tokenizer", data / "tok.model", "--out", data / "corpus",
             "--no-progress"], "1b. tokenize the corpus", env, out / "prepare.log")

    launch = [TORCHRUN, "--standalone", "--nproc_per_node", gpus, "launch/pretrain.py", "--no-progress"]
    shape = (["--seq-length", SMOKE["seq"], "--micro-batch-size", SMOKE["micro"], "--global-batch-size",
              SMOKE["global"], "--eval-iters", SMOKE["eval_iters"], "--lr-warmup-iters", SMOKE["warmup"],
              "--deepspeed_config", SMOKE["deepspeed_config"]]
             if args.smoke else ["--bf16", "--deepspeed_config", config["deepspeed_config"]])
    common = ["--config", HERE / "train.json", *shape, "--data-path", data / "corpus", "--tokenizer-model",
              data / "tok.model", "--eval-interval", args.eval_interval, "--log-interval", "10"]
    small_dir = out / "small"
    if not (small_dir / "latest").is_file():
        run([*launch, *common, "--init", "random", "--model-config", small_model, "--train-iters", args.small_steps,
             "--lr", args.small_lr, "--min-lr", args.small_min_lr, "--seed", 0, "--save", small_dir, "--save-moments",
             "--metrics-file", small_dir / "metrics.jsonl"], f"2. the small model ({args.small_steps} steps)",
            env, out / "small.log")
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = out / f"{arm.replace(' ', '_')}-seed{seed}"
            if (run_dir / "done").is_file():
                continue
            run_dir.mkdir(exist_ok=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            run([*launch, *common, "--clone-from", small_dir, "--train-iters", args.steps, "--lr", args.lr,
                 "--min-lr", args.lr / 10, "--seed", seed, "--metrics-file", run_dir / "metrics.jsonl",
                 *arm_flags(arm, args, small_dir)], f"3. {arm}, seed {seed} ({args.steps} steps)", env,
                run_dir / "log.txt")
            (run_dir / "done").write_text("ok\n")
    report(args, out, gpu, gpus, small_model)
    return 0


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def _median_of(metrics: Path, key: str) -> float | None:
    values = [json.loads(line).get(key) for line in metrics.read_text().splitlines()]
    values = [v for v in values if v is not None]
    return statistics.median(values[len(values) // 4:]) if values else None  # past the first, slower logs


def report(args, out: Path, gpu: str | None, gpus: int, small_model: str) -> None:
    from hyperclone_dist.config import ModelConfig
    from hyperclone_dist.growth.grow import Grower
    from hyperclone_dist.growth.spec import GrowthSpec
    from hyperclone_dist.train.monitor import flops_per_token

    small_cfg = ModelConfig.from_dict(json.loads((REPO / small_model).read_text()))
    large_cfg = Grower(small_cfg, GrowthSpec(width_factor=2), lambda name: None).large
    seq = 128 if args.smoke else json.loads((HERE / "train.json").read_text())["seq_length"]
    charge = args.small_steps * flops_per_token(small_cfg, seq) / flops_per_token(large_cfg, seq)
    runs = {arm: [out / f"{arm.replace(' ', '_')}-seed{s}" / "metrics.jsonl" for s in args.seeds] for arm in args.arms}
    curves = {arm: [read_curve(m, label=arm) for m in files] for arm, files in runs.items()}
    baseline = [c.final for c in curves["random"]] if "random" in curves else None
    rows = []
    for arm, arm_curves in curves.items():
        reach = [steps_to_reach(c, b) for c, b in zip(arm_curves, baseline)] if baseline else []
        reached = [r for r in reach if r is not None]
        if arm == "random" or not baseline:
            speed = all_in = "—"
        elif len(reached) < len(reach):
            speed = all_in = "not reached"
        else:
            speed = _mean([args.steps / max(r, 1) for r in reached])
            all_in = _mean([args.steps / (r + charge) for r in reached])
        rise = max(max(0.0, (max(c.losses) - c.losses[0]) / c.losses[0]) for c in arm_curves)
        mfu = [_median_of(m, "perf/mfu") for m in runs[arm]]
        tps = [_median_of(m, "perf/tokens_per_s") for m in runs[arm]]
        rows.append([arm, _mean([c.losses[0] for c in arm_curves]), _mean([c.final for c in arm_curves]),
                     _mean([float(r) for r in reached]) if reach and len(reached) == len(reach) else "—",
                     speed, all_in, f"{100 * rise:.1f}%",
                     f"{100 * statistics.mean(mfu):.1f}%" if all(v is not None for v in mfu) else "—",
                     f"{statistics.mean(tps):,.0f}" if all(v is not None for v in tps) else "—"])
    header = ["arm", "valid loss, step 0", "final valid loss", "steps to baseline's final",
              "speedup (large steps)", "speedup (all-in)", "worst rise", "MFU (median)", "tokens/s"]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(row) + " |" for row in rows])
    mean_curves = [curves[arm][0] for arm in curves]
    figure = (REPO / "docs" / "figures" / "gpu_100m_to_350m.png") if not args.smoke else out / "loss_curves.png"
    figure = Path(args.figure).resolve() if args.figure else figure
    plot_curves(mean_curves, figure, f"~100M -> ~350M, {gpu or 'CPU smoke run'} (seed {args.seeds[0]})",
                hline=(baseline[0], "random baseline's final loss") if baseline else None)
    where = f"{gpus} x {gpu}, bf16" if gpu else "CPU smoke run, float32, tiny model"
    body = (f"{SECTION}\n\nRun on {time.strftime('%Y-%m-%d')}, {where}. Small model {small_model} "
            f"({args.small_steps} steps); every arm {args.steps} steps of the x2 model, recipes/gpu-100m-to-350m/"
            f"train.json; seeds {args.seeds}. All-in speedup charges the small model's training "
            f"(= {charge:.0f} large-model steps).\n\n```bash\n.venv/bin/python recipes/gpu-100m-to-350m/run.py "
            f"--gpus {gpus} --steps {args.steps} --small-steps {args.small_steps}\n```\n\n{table}\n\n"
            f"![validation loss per arm](figures/{figure.name})\n")
    results = write_section(REPO / args.results if not Path(args.results).is_absolute() else args.results,
                            SECTION, body)
    print("\n" + table + f"\nwrote {results} and {figure}")


if __name__ == "__main__":
    sys.exit(main())
