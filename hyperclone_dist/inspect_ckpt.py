"""What a checkpoint holds (family, shape, parameter count, dtype), and whether its files still match
their checksum manifest (``hyperclone inspect --check``)."""

from __future__ import annotations

import re
from pathlib import Path

from hyperclone_dist.checkpoint.manifest import MANIFEST, ManifestCheck, check_manifest
from hyperclone_dist.checkpoint.source import stored_nbytes
from hyperclone_dist.checkpoint.training_state import DS_TAG_FILE
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron import legacy
from hyperclone_dist.params import parameter_count, stored_shapes
from hyperclone_dist.sources import open_source


def describe(path: str | Path, tensors: bool = False) -> str:
    source = open_source(path)
    cfg = source.config
    lines = [
        f"path        {source.path} ({source.kind})",
        f"family      {cfg.family}",
        f"parameters  {parameter_count(cfg):,} ({stored_nbytes(source) / 2**20:.1f} MiB, "
        f"{str(source.dtype).removeprefix('torch.')})",
        (f"shape       layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads {cfg.num_heads} "
         f"(kv {cfg.num_kv_heads}, head_dim {cfg.head_dim}), ffn {cfg.ffn_hidden_size}"
         f"{' gated' if cfg.gated_mlp else ''}, vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}"),
        (f"blocks      {cfg.norm}, {cfg.position_embedding} positions, activation {cfg.activation}, "
         f"{'tied' if cfg.tie_word_embeddings else 'untied'} head"
         f"{', parallel residual' if cfg.parallel_residual else ''}{'' if cfg.pre_norm else ', post-LN'}"),
    ]
    if tensors:
        for name, shape in stored_shapes(cfg).items():
            lines.append(f"  {name:<40} {list(shape)}")
    return "\n".join(lines)


def manifest_dirs(path: str | Path) -> list[Path]:
    """The directories ``--check`` verifies: ``path`` itself when it holds a manifest (HF, converted or exported
    megatron checkpoints, one training step's directory); for a ``pretrain.py --save`` directory, its latest
    checkpoint: the DeepSpeed tag named by ``latest`` and the ``iter_*`` named by the megatron tracker."""
    root = Path(path)
    if not root.exists():
        raise HypercloneError(f"{root} does not exist")
    if not root.is_dir():
        raise HypercloneError(f"{root} is a file; --check verifies a checkpoint directory by its {MANIFEST}")
    if (root / MANIFEST).is_file() or not (root / DS_TAG_FILE).is_file():
        return [root]  # check_manifest names a missing manifest
    tag = (root / DS_TAG_FILE).read_text().strip()
    if not re.fullmatch(r"[\w.-]+", tag) or tag.startswith("."):
        raise HypercloneError(f"{root / DS_TAG_FILE} holds {tag[:40]!r}, not a checkpoint tag")
    dirs = [root / tag]
    if (root / legacy.TRACKER).is_file():
        dirs.append(legacy.latest_dir(root))
    for d in dirs:
        if not (d / MANIFEST).is_file():
            raise HypercloneError(f"{d} has no {MANIFEST} (written by a hyperclone without checksums, or incomplete)")
    return dirs


def check_checkpoint(path: str | Path) -> ManifestCheck:
    """Every file of the checkpoint at ``path`` against its manifest; problems name the file and, for a
    changed file, the tensors whose bytes changed."""
    root = Path(path)
    total = ManifestCheck()
    for d in manifest_dirs(root):
        one = check_manifest(d, "" if d == root else f"{d.relative_to(root).as_posix()}/")
        total.problems += one.problems
        total.warnings += one.warnings
        total.files += one.files
        total.tensors += one.tensors
        total.nbytes += one.nbytes
    return total
