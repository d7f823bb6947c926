"""Training throughput of launch/pretrain.py against a bare PyTorch loop over the same model and data.

    .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--repeats 2]

Both sides train the same megatron-core GPTModel (TP1 x PP1 x DP1, float32, one process), grown x2 from
the same small model, on the same batches of the embedded corpus, with AdamW and gradient clipping:

- pretrain.py: the real job (DeepSpeed engine, data feed, logging to metrics.jsonl), started as a
  subprocess exactly as a user would; tokens/s are read from its per-step metrics.
- bare loop: ``bare_loop()`` below, in a fresh subprocess: forward, masked cross entropy, backward,
  ``clip_grad_norm_``, ``AdamW.step`` — no engine, no logging.

Runs alternate (pretrain, bare, pretrain, bare, ...) so that machine noise hits both; the first
``--warmup`` steps of each run are dropped and the median step rate is compared. Also printed: the time
from launching pretrain.py with --clone-from to the start of its first step. Requirement (exit 1 if
missed): pretrain tokens/s >= 0.9 x the bare loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hyperclone_dist.config import ModelConfig  # noqa: E402

TARGET = 0.9
SMALL = ModelConfig(family="llama", vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=32, ffn_hidden_size=352, max_position_embeddings=256, norm="rmsnorm", norm_eps=1e-6)
SEQ, MICRO, GLOBAL = 256, 4, 8
LR = 1e-3


def common_flags(small: Path) -> list[str]:
    return ["--clone-from", str(small), "--width-factor", "2", "--method", "noisy", "--seq-length", str(SEQ),
            "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL), "--lr", str(LR),
            "--lr-decay-style", "constant", "--clip-grad", "1.0", "--weight-decay", "0.1"]


def run_pretrain(small: Path, steps: int, workdir: Path, env: dict) -> tuple[list[float], float]:
    metrics = workdir / f"pretrain-{time.time_ns()}.jsonl"
    launched = time.time()
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), *common_flags(small), "--train-iters", str(steps),
           "--no-progress", "--metrics-file", str(metrics)]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, timeout=1800)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    first = lines[0]
    startup = first["time"] - first["perf/step_seconds"] - launched
    return [line["perf/tokens_per_s"] for line in lines], startup


def run_bare(small: Path, steps: int, env: dict) -> list[float]:
    out = subprocess.run([sys.executable, __file__, "--bare", str(small), "--steps", str(steps)], env=env, cwd=REPO,
                         check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bare_loop(small: Path, steps: int) -> list[float]:
    """The reference: the same model and batches, trained by the plainest PyTorch loop."""
    import torch

    from hyperclone_dist.train.args import parse_args
    from hyperclone_dist.train.loop import Run, prepare_environment
    from hyperclone_dist.train.step import masked_mean, real_vocab_cross_entropy

    prepare_environment()
    from hyperclone_dist.megatron.parallel import init_distributed

    init_distributed()
    # the trainer's own set-up builds the identical model and data feed; no engine is made
    run = Run(parse_args([*common_flags(small), "--train-iters", str(steps)]))
    run.setup_layout()
    run.setup_data()
    run.setup_model()
    model = run.chunks[0]
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.95), eps=1e-8)
    from hyperclone_dist.megatron.model import causal_attention_mask

    mask = causal_attention_mask(SEQ)
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        micro_batches = run.feed.train_batches(step)
        for batch in micro_batches:
            logits = model(batch["tokens"], batch["position_ids"], mask)
            loss = masked_mean(real_vocab_cross_entropy(logits, batch["labels"], SMALL.vocab_size), batch["loss_mask"])
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(GLOBAL * SEQ / (time.perf_counter() - start))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bare", metavar="SMALL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare_loop(Path(args.bare), args.steps)))
        return 0

    from hyperclone_dist.builtin import random_state_dict
    from hyperclone_dist.checkpoint import small_pt

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    env.setdefault("HYPERCLONE_CACHE", str(REPO / ".cache" / "hyperclone"))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        small = small_pt.save(workdir / "small.pt", SMALL, random_state_dict(SMALL, seed=0))
        print(f"model: llama hidden {SMALL.hidden_size} -> {2 * SMALL.hidden_size}, {SMALL.num_layers} layers, "
              f"vocab {SMALL.vocab_size}; batch {GLOBAL} x {SEQ} tokens (micro {MICRO}); float32, one process, "
              f"torch threads {env.get('OMP_NUM_THREADS', 'default')}")
        pretrain_rates, bare_rates, startups = [], [], []
        for repeat in range(args.repeats):
            rates, startup = run_pretrain(small, args.steps, workdir, env)
            pretrain_rates += rates[args.warmup:]
            startups.append(startup)
            bare_rates += run_bare(small, args.steps, env)[args.warmup:]
            print(f"  repeat {repeat + 1}: pretrain.py {statistics.median(rates[args.warmup:]):8.0f} tok/s   "
                  f"bare loop {statistics.median(bare_rates[-(args.steps - args.warmup):]):8.0f} tok/s   "
                  f"launch -> first step {startup:5.1f} s")
    ours, bare = statistics.median(pretrain_rates), statistics.median(bare_rates)
    ratio = ours / bare
    print(f"median tokens/s over {len(pretrain_rates)} steps each: pretrain.py {ours:.0f}, "
          f"bare PyTorch loop {bare:.0f}")
    print(f"ratio pretrain.py / bare loop: {ratio:.3f} (target >= {TARGET}): {'MET' if ratio >= TARGET else 'NOT met'}")
    print(f"launch -> first step with --clone-from (imports, process group, growth, data index, engine): "
          f"median {statistics.median(startups):.1f} s")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
