"""Inputs of the GPU check that are CPU work: the embedded corpus tokenized for the model's vocabulary (built
here by prepare_wheels.sh and carried, or built on the GPU machine if missing), a random small model of the
GPU recipe's small shape to clone from, and the recipe's data folder seeded with that corpus.

    .venv/bin/python benchmarks/gpu/prepare_inputs.py --model-config configs/models/llama-100m.json \\
        --cache .cache/gpu-corpus [--small runs/gpu-check/small.pt] [--recipe-data runs/gpu-check/e/data]

The small model has random weights: the check measures the CUDA path and its speed, not what a trained
model learns (the recipe stage trains its own small model first).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from gpu_common import OneLineParser, write_json


def corpus_paths(cache: str | Path, vocab_size: int, build: bool = False) -> tuple[Path, Path]:
    """(dataset prefix, tokenizer) of the embedded corpus for ``vocab_size`` under the cache ``pretrain.py``
    reads as $HYPERCLONE_CACHE; the trainer's own function, so the two never disagree on the names."""
    from hyperclone_dist.train.data_feed import default_corpus

    return default_corpus(Path(cache), vocab_size, build=build)


def vocab_of(model_config: str | Path) -> int:
    from hyperclone_dist.config import ModelConfig
    from hyperclone_dist.jsonfile import read_json_object

    return ModelConfig.from_dict(read_json_object(model_config, "model config")).vocab_size


def write_small(model_config: str | Path, out: Path, seed: int) -> Path:
    from hyperclone_dist.builtin import random_state_dict
    from hyperclone_dist.checkpoint import small_pt
    from hyperclone_dist.config import ModelConfig
    from hyperclone_dist.jsonfile import read_json_object

    cfg = ModelConfig.from_dict(read_json_object(model_config, "model config"))
    out.parent.mkdir(parents=True, exist_ok=True)
    return small_pt.save(out, cfg, random_state_dict(cfg, seed=seed), {"origin": f"random, seed {seed}"})


def seed_recipe_data(prefix: Path, tokenizer: Path, data: Path) -> None:
    """The names recipes/gpu-100m-to-350m/run.py looks for before it trains a tokenizer and tokenizes a corpus
    (its steps 1a and 1b are skipped when they exist)."""
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, data / "tok.model")
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{prefix}{suffix}", data / f"corpus{suffix}")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="prepare_inputs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", required=True, help="the small model's shape (its vocabulary sizes the corpus)")
    p.add_argument("--cache", required=True, help="the folder pretrain.py reads as $HYPERCLONE_CACHE")
    p.add_argument("--small", type=Path, help="write a random small model of --model-config here (small.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe-data", type=Path, help="seed the GPU recipe's data folder with the corpus")
    p.add_argument("--paths-only", action="store_true", help="print where the corpus is (or would be); build nothing")
    p.add_argument("--json-out", type=Path, help="also write what is printed to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    from hyperclone_dist.errors import HypercloneError

    args = build_parser().parse_args(argv)
    try:
        prefix, tokenizer = corpus_paths(args.cache, vocab_of(args.model_config), build=not args.paths_only)
        out = {"prefix": str(prefix), "tokenizer": str(tokenizer)}
        if not args.paths_only:
            if args.small:
                out["small"] = str(write_small(args.model_config, args.small, args.seed))
            if args.recipe_data:
                seed_recipe_data(prefix, tokenizer, args.recipe_data)
                out["recipe_data"] = str(args.recipe_data)
    except (HypercloneError, OSError) as exc:
        print(f"prepare_inputs.py: error: {exc}", file=sys.stderr)
        return 2
    if args.json_out:
        write_json(args.json_out, out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
