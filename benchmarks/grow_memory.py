"""Peak memory of growing a ~125M-parameter model into a sharded Hugging Face checkpoint.

    .venv/bin/python benchmarks/grow_memory.py [--width-factor 2] [--dtype float32] [--shard-gib 0.5]

Builds a GPT-2-small-shaped model (124M parameters, random weights, tied head) as an HF directory of
safetensors, then grows it twice, each time in a fresh interpreter so that nothing else is resident:

- streaming: ``hyperclone_dist.convert.convert(..., fmt="hf")``, growing and writing one tensor at a time;
- naive: the whole small model loaded, every grown tensor kept in a dict, then one ``save_file``.

Requirement checked (exit status 1 if missed): the streaming peak resident set stays within
``baseline + 1.3 * (small model bytes + largest output shard)``, baseline being the child's resident set
after importing torch and hyperclone_dist. Only ratios are asserted; the machine's speed never is.

The streaming peak is the memory-mapped source (every page read stays counted in RSS while the file is
open, though the kernel may drop those clean pages), the largest grown tensor (the 50257 x 1536 embedding
or head) and temporaries the size of one small tensor; the naive peak adds the whole grown model.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _common import MIB, load_small_whole, status_kib, write_small_model
from safetensors.torch import save_file

from hyperclone_dist.checkpoint.hf_writer import plan_tensors
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.convert import DTYPES, convert
from hyperclone_dist.families import FAMILIES
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.hf_fusion import fuse_hf
from hyperclone_dist.params import parameter_count

BOUND_FACTOR = 1.3

# GPT-2 small: 124M parameters, 498 MB in fp32; x2 width gives ~494M parameters (untied head).
GPT2_SMALL = ModelConfig(
    family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
    head_dim=64, ffn_hidden_size=3072, max_position_embeddings=1024, norm="layernorm", norm_eps=1e-5,
    activation="gelu_new", gated_mlp=False, position_embedding="learned", tie_word_embeddings=True,
    qkv_bias=True, attn_out_bias=True, mlp_bias=True, norm_bias=True,
)


def grow_streaming(src: str, out: str, spec: GrowthSpec, dtype: str, shard_bytes: int) -> int:
    result = convert(src, out, spec, fmt="hf", dtype=dtype, shard_bytes=shard_bytes, progress=False)
    return result.largest_shard_bytes


@torch.inference_mode()
def grow_naive(src: str, out: str, spec: GrowthSpec, dtype: str, shard_bytes: int) -> int:
    """What one would write without streaming: everything in memory, one save_file at the end (a single
    file, so ``shard_bytes`` goes unused)."""
    out_dir = Path(out)
    cfg, small = load_small_whole(Path(src))
    family = FAMILIES[cfg.family]
    grower = Grower(cfg, spec, small.__getitem__)
    canonical = {name: grower.shapes[name] for name in grower.names()}
    grown = {}
    for t in plan_tensors(grower.large, canonical, DTYPES[dtype]):
        grown[t.name] = fuse_hf(family, t.template, [grower.full(p).to(DTYPES[dtype]) for p in t.parts],
                                grower.large)
    out_dir.mkdir(parents=True)
    save_file(grown, out_dir / "model.safetensors", metadata={"format": "pt"})
    return sum(t.nbytes for t in grown.values())


def measure(pipeline: str, out: str, src: str, spec: GrowthSpec, dtype: str, shard_bytes: int) -> dict:
    """Runs in a fresh spawned interpreter: baseline after imports, then the peak of one growth."""
    baseline = status_kib("VmRSS")
    start = time.perf_counter()
    grow = {"streaming": grow_streaming, "naive": grow_naive}[pipeline]
    largest_shard = grow(src, out, spec, dtype, shard_bytes)
    return {"baseline": baseline * 1024, "peak": status_kib("VmHWM") * 1024, "largest_shard": largest_shard,
            "seconds": time.perf_counter() - start}


def in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def report(stream: dict, naive: dict | None, small_bytes: int) -> bool:
    """Print the measurements; True when the streaming peak is within the bound."""
    largest = stream["largest_shard"]
    bound = stream["baseline"] + BOUND_FACTOR * (small_bytes + largest)
    ratio = (stream["peak"] - stream["baseline"]) / (small_bytes + largest)
    print(f"interpreter baseline (torch + hyperclone_dist imported): {stream['baseline'] / MIB:.0f} MiB")
    print(f"streaming peak RSS: {stream['peak'] / MIB:.0f} MiB ({stream['seconds']:.0f} s)")
    print(f"bound: baseline + {BOUND_FACTOR} x (small {small_bytes / MIB:.0f} MiB + largest shard "
          f"{largest / MIB:.0f} MiB) = {bound / MIB:.0f} MiB")
    print(f"ratio (peak - baseline) / (small + largest shard): {ratio:.2f} (must be <= {BOUND_FACTOR})")
    if naive is not None:
        above = (naive["peak"] - naive["baseline"]) / (stream["peak"] - stream["baseline"])
        print(f"naive peak RSS (load all, grow into a dict, save_file): "
              f"{naive['peak'] / MIB:.0f} MiB ({naive['seconds']:.0f} s)")
        total = naive["peak"] / stream["peak"]
        print(f"naive / streaming: {above:.2f}x above baseline, {total:.2f}x in total")
    if stream["peak"] > bound:
        print(f"FAIL: streaming peak {stream['peak'] / MIB:.0f} MiB exceeds the bound {bound / MIB:.0f} MiB")
        return False
    print("PASS: streaming growth stays within the bound")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width-factor", type=int, default=2, help="n: hidden size and heads grow xn")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the grown checkpoint")
    parser.add_argument("--shard-gib", type=float, default=0.5,
                        help="shard size of the grown checkpoint, GiB")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="parent of the scratch directory (default: the system's temp dir)")
    parser.add_argument("--skip-naive", action="store_true", help="measure the streaming path only")
    args = parser.parse_args(argv)

    spec = GrowthSpec(width_factor=args.width_factor)
    shard_bytes = int(args.shard_gib * 1024**3)
    scratch = Path(tempfile.mkdtemp(prefix="grow-memory-", dir=args.workdir))
    try:
        small_dir = scratch / "small"
        small_bytes = write_small_model(small_dir, GPT2_SMALL)
        print(f"small model: GPT-2 small shape, {parameter_count(GPT2_SMALL) / 1e6:.1f}M parameters, "
              f"{small_bytes / MIB:.0f} MiB fp32 safetensors")
        print(f"growth: width x{spec.n}, ffn x{spec.m}, {spec.method}, output {args.dtype}, "
              f"shards <= {shard_bytes / MIB:.0f} MiB")
        common = (str(small_dir), spec, args.dtype, shard_bytes)
        stream = in_fresh_process("streaming", str(scratch / "streaming"), *common)
        grown_bytes = sum(f.stat().st_size for f in (scratch / "streaming").glob("*.safetensors"))
        print(f"grown model: {grown_bytes / MIB:.0f} MiB of safetensors, "
              f"largest shard {stream['largest_shard'] / MIB:.0f} MiB")
        shutil.rmtree(scratch / "streaming")  # one grown copy on disk at a time
        naive = None if args.skip_naive else in_fresh_process("naive", str(scratch / "naive"), *common)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if report(stream, naive, small_bytes) else 1


if __name__ == "__main__":
    sys.exit(main())
