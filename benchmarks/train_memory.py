"""Peak resident memory of a CPU training process against ``pretrain.py --dry-run``'s estimate for it.

    .venv/bin/python benchmarks/train_memory.py [--source HFDIR] [--workdir DIR] [--widths 1 2]

The source defaults to SmolLM2-135M-Instruct as tests/real_models.py builds it (bf16 safetensors, its own
tokenizer). For each width factor, in one run: the dry run's "CPU process" figure for the job, then the
job itself, ``launch/pretrain.py --clone-from SOURCE --width-factor N --method noisy`` for 2 steps of
2 x 128 tokens in float32 on English text prepared with ``hyperclone data prepare --tokenizer SOURCE``,
saving once at the end; its peak resident set is the process's own high-water mark (VmHWM), read from
/proc while it runs. Requirement (exit status 1 if missed): the estimate is within 10% of the measured peak.
The checkpoint sizes are printed per directory in bytes per parameter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TOLERANCE = 0.10
GIB = 1024**3
TRAIN = ["--method", "noisy", "--train-iters", "2", "--global-batch-size", "2", "--micro-batch-size", "1",
         "--seq-length", "128", "--lr", "1e-5", "--no-progress"]


def english_corpus(path: Path) -> None:
    """Real English prose every Python installation carries: the language reference's topics (pydoc)."""
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))


def high_water_mark(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], log: Path) -> int:
    """Run cmd; its peak resident set in bytes (the last VmHWM read before it exited)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        peak = [0]

        def poll():
            while proc.poll() is None:
                peak[0] = max(peak[0], high_water_mark(proc.pid) or 0)
                time.sleep(0.05)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        proc.wait()
        watcher.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return peak[0]


def estimated_cpu_peak(args: list[str]) -> tuple[float, int]:
    from hyperclone_dist.train.args import parse_args
    from hyperclone_dist.train.dryrun import estimate, model_shape
    from hyperclone_dist.train.engine import read_deepspeed_config, zero_stage
    from hyperclone_dist.train.run_plan import plan_run

    config = parse_args([*args, "--dry-run", "--world-size", "1"])
    cfg = model_shape(config)
    zero = max(1, zero_stage(read_deepspeed_config(config.engine.deepspeed_config)))
    ranks = estimate(config, cfg, plan_run(config, cfg, 1), zero)
    return max(r.cpu_total for r in ranks), sum(r.params for r in ranks)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2])
    opts = parser.parse_args()
    source = opts.source or Path(subprocess.run([PYTHON, str(REPO / "tests" / "real_models.py"), "smollm2"],
                                                check=True, capture_output=True, text=True).stdout.split()[-1])
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="train-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    english_corpus(work / "english.jsonl")
    subprocess.run([PYTHON, "-m", "hyperclone_dist.cli.main", "data", "prepare", "--input", str(work / "english.jsonl"),
                    "--tokenizer", str(source), "--out", str(work / "english")], cwd=REPO, check=True,
                   capture_output=True)
    print(f"source {source}; one CPU process, float32, ZeRO-1, 2 steps of 2 x 128 tokens, one save")
    print(f"{'width':>5} {'params':>8} {'measured GiB':>13} {'estimate GiB':>13} {'est/meas':>9} {'DeepSpeed B/p':>14} "
          f"{'torch_dist B/p':>15}")
    missed = []
    for width in opts.widths:
        args = ["--clone-from", str(source), "--width-factor", str(width), *TRAIN, "--data-path",
                str(work / "english")]
        estimate, params = estimated_cpu_peak(args)
        save = work / f"save-x{width}"
        shutil.rmtree(save, ignore_errors=True)
        peak = run_measured([PYTHON, "launch/pretrain.py", *args, "--save", str(save)], work / f"x{width}.log")
        ds, td = directory_bytes(save / "global_step2"), directory_bytes(save / "iter_0000002")
        ratio = estimate / peak
        print(f"{width:>5} {params / 1e6:>7.0f}M {peak / GIB:>13.2f} {estimate / GIB:>13.2f} {ratio:>9.3f} "
              f"{ds / params:>14.1f} {td / params:>15.1f}")
        if abs(ratio - 1) > TOLERANCE:
            missed.append(f"width {width}: estimate/measured {ratio:.3f}")
        shutil.rmtree(save, ignore_errors=True)
    if not opts.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"requirement (estimate within {TOLERANCE:.0%} of the measured peak): "
          f"{'met' if not missed else 'MISSED: ' + '; '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
