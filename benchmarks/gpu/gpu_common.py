"""What the GPU check's helpers share: the repository root, a parser whose errors are one line, JSON
results, and a description of the machine and of where each package came from.

    python3 benchmarks/gpu/gpu_common.py env --out runs/gpu-check/results/env.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # hyperclone_dist from the checkout, as launch/pretrain.py does

# the packages whose versions a reader needs to compare figures (the rest of the image is not ours)
REPORTED = ("torch", "megatron-core", "deepspeed", "transformers", "safetensors", "sentencepiece", "pydantic",
            "numpy", "triton")


class OneLineParser(argparse.ArgumentParser):
    """Bad input ends with one line on stderr and exit status 2, not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def write_json(path: str | Path, value: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)  # a reader never sees half a file, even from a stage killed at its time limit
    return path


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def package_origins(carried_site: str | None) -> dict[str, dict]:
    """{name: {"version", "from"}}: "wheels" when it was installed into the carried-wheel folder,
    "image" when the interpreter already had it, absent when neither has it."""
    out = {}
    for name in REPORTED:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        where = str(dist.locate_file(""))
        from_wheels = bool(carried_site) and where.startswith(str(carried_site))
        out[name] = {"version": dist.version, "from": "wheels" if from_wheels else "image"}
    return out


def environment(carried_site: str | None = None) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": None, "gpu_memory_gib": None, "packages": package_origins(carried_site)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 1024**3, 1),
                   gpus=torch.cuda.device_count())
    return env


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="gpu_common.py", description="describe this machine for the GPU check's report")
    parser.add_argument("what", choices=["env"])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--site", help="the folder carried wheels were installed into")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = environment(args.site)
    write_json(args.out, env)
    print(json.dumps(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
