"""The long-budget corpus: everything a Python installation ships as text, big enough that no run repeats it.

    .venv/bin/python recipes/long_budget/corpus.py --out runs/long_budget/corpus

The embedded default corpus (8 MB of stdlib sources, ~4.4M tokens at vocab 512) repeats after ~1900 steps
of 16 x 128 tokens, so a 2000-step run plus a small model's data stream would train on it twice. This one
takes every UTF-8 ``*.py`` file under the stdlib, package test suites included (real code, ~2.5x the
default), and the English of ``pydoc_data.topics`` (the language reference's prose, one topic a document).
Nothing is downloaded, and one Python installation always yields the same bytes. Documents are ordered by
a hash of their name so that the trainer's contiguous 90/10 split by documents mixes code, tests and prose
in both halves instead of holding out the tail of the alphabet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIPPED = {"site-packages", "dist-packages", "__pycache__"}  # installed packages differ between machines
VOCAB = 512  # the size of configs/models/llama-tiny.json's embedding


def documents() -> list[tuple[str, str]]:
    """(name, text) of every document, in hashed-name order."""
    import pydoc_data.topics

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIPPED.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8
        if text.strip():
            docs.append((rel.as_posix(), text))
    docs += [(f"pydoc_data.topics/{key}", text) for key, text in pydoc_data.topics.topics.items() if text.strip()]
    return sorted(docs, key=lambda doc: hashlib.sha1(doc[0].encode()).hexdigest())


def build(out: Path, limit: int | None = None) -> Path:
    """Write the tokenizer OUT/tok.model and the dataset OUT/long.{bin,idx} (the first ``limit`` documents
    only, for a smoke run); return the prefix. An existing one is kept."""
    prefix = out / "long"
    if (prefix.with_suffix(".idx")).is_file() and (out / "tok.model").is_file():
        return prefix
    out.mkdir(parents=True, exist_ok=True)
    docs = documents()[:limit]
    with open(out / "docs.jsonl", "w") as f:
        for _, text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    cli = [sys.executable, "-m", "hyperclone_dist.cli.main", "data"]
    subprocess.run([*cli, "tokenizer", "--input", out / "docs.jsonl", "--out", out / "tok", "--vocab-size",
                    str(VOCAB)], cwd=REPO, check=True, capture_output=True)
    subprocess.run([*cli, "prepare", "--input", out / "docs.jsonl", "--tokenizer", out / "tok.model", "--out",
                    prefix, "--no-progress"], cwd=REPO, check=True, capture_output=True)
    (out / "docs.jsonl").unlink()  # the .bin holds it all now
    return prefix


def token_count(prefix: Path) -> int:
    import numpy as np

    return int(np.memmap(prefix.with_suffix(".bin"), dtype=np.uint16, mode="r").size)  # vocab < 65500: uint16


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/long_budget/corpus")
    prefix = build(REPO / p.parse_args().out)
    print(f"{prefix}: {token_count(prefix)} tokens")
