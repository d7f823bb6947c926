"""Any partition of a grown tensor into slices, built independently, equals growing it whole, bitwise.

This is what lets each tensor-/pipeline-parallel rank build only its own shard."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys

import pytest
import torch

from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import METHODS, GrowthSpec
from hyperclone_dist.sources import open_source

SPECS = [GrowthSpec(2, 2, method=m, seed=11) for m in METHODS] + [
    GrowthSpec(3, 2, method="noisy", seed=2),
    GrowthSpec(3, 1, method="noisy-diagonal", seed=2, insert_layers="every:1"),
    GrowthSpec(2, method="warmstart", stack=2, seed=4),
]


def _cuts(size: int, rng: random.Random) -> list[int]:
    inner = sorted(rng.sample(range(1, size), k=min(size - 1, rng.randint(1, 4)))) if size > 1 else []
    return [0, *inner, size]


def _assemble(grower_factory, name, shape, rng) -> torch.Tensor:
    """Rebuild the tensor from a random grid of slices, each from a fresh Grower (a fresh 'rank')."""
    cuts = [_cuts(s, rng) for s in shape]
    if len(shape) == 1:
        return torch.cat([grower_factory().slice(name, (slice(a, b),)) for a, b in zip(cuts[0], cuts[0][1:])])
    rows = []
    for r0, r1 in zip(cuts[0], cuts[0][1:]):
        rows.append(torch.cat([grower_factory().slice(name, (slice(r0, r1), slice(c0, c1)))
                               for c0, c1 in zip(cuts[1], cuts[1][1:])], dim=1))
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-n{s.n}-m{s.m}-stack{s.stack}-{s.insert_layers}")
@pytest.mark.parametrize("case", ["llama-mqa-tied-bias", "gpt2-untied"])
def test_random_partitions_equal_whole(tiny_model_dirs, spec, case):
    source = open_source(tiny_model_dirs[case])
    whole = Grower(source.config, spec, source.get)
    rng = random.Random(f"{case}-{spec}")
    for name in whole.names():
        reference = whole.full(name)
        for _ in range(2):
            # the pieces read only the rows they need where they can; the reference reads whole tensors
            pieces = _assemble(lambda: Grower(source.config, spec, source.get, source.get_rows), name,
                               whole.shapes[name], rng)
            assert torch.equal(pieces, reference), name


_DIGEST_SCRIPT = """
import hashlib, json, sys, torch
from hyperclone_dist.sources import open_source
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
path, spec = sys.argv[1], json.loads(sys.argv[2])
src = open_source(path)
g = Grower(src.config, GrowthSpec(**spec), src.get)
h = hashlib.sha256()
for name in g.names():
    h.update(g.full(name).numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.parametrize("method", ["noisy", "noisy-diagonal", "warmstart"])
def test_other_processes_and_thread_counts_agree(tiny_model_dirs, method):
    """A process with another thread count (as under torchrun, OMP_NUM_THREADS=1) grows the same bits."""
    spec = {"width_factor": 2, "method": method, "seed": 9}
    path = str(tiny_model_dirs["llama-gqa2"])
    digests = set()
    for threads in ("1", "2"):
        env = {"OMP_NUM_THREADS": threads, "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT, path, json.dumps(spec)], env=env,
                             capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    source = open_source(path)
    grower = Grower(source.config, GrowthSpec(**spec), source.get)
    local = hashlib.sha256()
    for name in grower.names():
        local.update(grower.full(name).numpy().tobytes())
    digests.add(local.hexdigest())
    assert len(digests) == 1
