"""Train and validation datasets through megatron-core's ``BlendedMegatronDatasetBuilder`` and ``GPTDataset``.

    from hyperclone_dist.data.loader import DataConfig, batch_at, build_datasets, data_parallel_slice
    cfg = DataConfig(prefixes=("data/stdlib",), tokenizer_model="data/tok.model",
                     cache_dir="runs/x/data_cache", sequence_length=256)
    ds = build_datasets(cfg, train_samples=iters * gbs, valid_samples=eval_iters * gbs)
    first, count = data_parallel_slice(step, gbs, dp_rank, dp_size)
    batch = batch_at(ds.train, first, count)  # tokens, labels, loss_mask, position_ids: [count, seq]

Sample ``i`` of a dataset is a pure function of the data files, the tokenizer, the split, the sequence
length, the seed and the number of samples asked for, so a resumed run that asks for the same numbers reads
the same samples from ``step * gbs`` on, on any number of ranks.

Works in one process and under torchrun: when a process group exists, megatron builds the index caches on
global rank 0, barriers, and the other ranks load them (``cache_dir`` must be on a filesystem all ranks
see). Every input check runs on every rank before megatron is called, so a bad input raises everywhere
instead of leaving ranks 1.. waiting at a barrier for a rank 0 that failed. Nothing here calls CUDA
(megatron's only CUDA call on this path, ``torch.cuda.device_count()``, answers 0 on a CPU-only build).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hyperclone_dist.data.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info
from hyperclone_dist.errors import HypercloneError

__all__ = ["DataConfig", "Datasets", "IndexedStats", "TokenizerInfo", "batch_at", "build_datasets",
           "data_parallel_slice", "inspect_prefix", "parse_blend", "split_shares", "tokenizer_info"]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it into samples; everything that decides which tokens sample i holds."""

    prefixes: tuple[str, ...]  # PREFIX of each PREFIX.bin/PREFIX.idx pair (hyperclone data prepare --out)
    tokenizer_model: str  # the tokenizer the prefixes were prepared with: PREFIX.model or a Hugging Face one
    cache_dir: str  # megatron's index caches go under here; shared by all ranks
    weights: tuple[float, ...] | None = None  # blend weights; None: in proportion to each prefix's tokens
    split: str = "949,50,1"  # train,valid,test shares of each prefix's documents (contiguous ranges)
    sequence_length: int = 1024  # tokens per sample (labels are the same tokens shifted by one)
    seed: int = 1234  # shuffles documents, samples and the blend

    def __post_init__(self):
        prefixes = (self.prefixes,) if isinstance(self.prefixes, (str, Path)) else self.prefixes
        object.__setattr__(self, "prefixes", tuple(str(p) for p in prefixes))
        if not self.prefixes:
            raise HypercloneError("the data config names no dataset prefix")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.prefixes):
                raise HypercloneError(f"{len(self.weights)} blend weights for {len(self.prefixes)} "
                                      f"dataset prefixes")
            if not all(math.isfinite(w) and w > 0 for w in self.weights):
                raise HypercloneError(f"blend weights must be positive, got {list(self.weights)}")
        if not isinstance(self.sequence_length, int) or self.sequence_length < 1:
            raise HypercloneError(f"sequence_length must be a positive integer, got {self.sequence_length!r}")
        shares = split_shares(self.split)
        if shares[0] <= 0:
            raise HypercloneError(f"split {self.split!r} gives the train set no documents")


@dataclass
class Datasets:
    """The built splits (None where no samples were asked for) and where their caches live."""

    train: Any  # megatron GPTDataset, or BlendedDataset for several prefixes
    valid: Any | None
    cache_dir: Path  # DataConfig.cache_dir / a fingerprint of the data files and the tokenizer
    tokenizer: TokenizerInfo
    documents: dict[str, int] = field(default_factory=dict)  # per prefix


@dataclass(frozen=True)
class IndexedStats:
    prefix: str
    documents: int
    tokens: int
    dtype: str  # numpy dtype of the ids in PREFIX.bin
    max_token_id: int | None = None  # only when asked for (it reads the whole .bin)


def split_shares(split: str) -> list[float]:
    """'949,50,1' -> normalized [train, valid, test] shares (megatron's parse, with a one-line error)."""
    parts = [p for p in re.split(r"[,/]", str(split).strip()) if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise HypercloneError(f"bad split {split!r}: give up to three non-negative shares like 949,50,1")
    values += [0.0] * (3 - len(values))
    return [v / sum(values) for v in values]


def parse_blend(items: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's ``--data-path`` convention: ``PREFIX ...`` or ``W1 PREFIX1 W2 PREFIX2 ...``."""
    items = list(items)
    if not items:
        raise HypercloneError("no dataset prefix given")

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    if number(items[0]) is None:
        return items, None
    if len(items) % 2:
        raise HypercloneError(f"a weighted blend alternates WEIGHT PREFIX; got {len(items)} items")
    weights = [number(w) for w in items[0::2]]
    if any(w is None for w in weights):
        raise HypercloneError(f"a weighted blend alternates WEIGHT PREFIX; got {' '.join(items)}")
    return items[1::2], weights


def _open_indexed(prefix: str):
    """megatron's ``IndexedDataset`` at ``prefix`` after checking both files exist and agree in size.

    Keep the returned object referenced while using any array taken from it: megatron closes the mmaps
    those arrays view when the object is collected (reading them after that crashes the process).
    """
    for suffix in (".idx", ".bin"):
        if not Path(prefix + suffix).is_file():
            raise HypercloneError(f"dataset {prefix}: {prefix}{suffix} is missing "
                                  f"(write it with hyperclone data prepare)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, OSError, KeyError, IndexError) as exc:
        raise HypercloneError(f"dataset {prefix}: {prefix}.idx is not a megatron index "
                              f"({exc or 'unreadable'})") from None
    expected = int(dataset.sequence_lengths.sum(dtype="int64")) * dataset.index.dtype_size
    actual = Path(prefix + ".bin").stat().st_size
    if actual != expected:
        raise HypercloneError(f"dataset {prefix}: {prefix}.bin holds {actual} bytes, "
                              f"its .idx describes {expected}")
    if len(dataset) == 0:
        raise HypercloneError(f"dataset {prefix} holds no documents")
    return dataset


def inspect_prefix(prefix: str | Path, *, max_token_id: bool = False) -> IndexedStats:
    """Documents, tokens and dtype of a prepared dataset (one-line errors for missing or torn files)."""
    dataset = _open_indexed(str(prefix))
    tokens = int(dataset.sequence_lengths.sum(dtype="int64"))
    top = int(dataset.bin_reader.read(dataset.index.dtype, tokens, 0).max()) if max_token_id else None
    return IndexedStats(str(prefix), len(dataset), tokens, dataset.index.dtype.__name__, top)


def _fingerprint(prefixes: Sequence[str], tokenizer: TokenizerInfo) -> str:
    """Content hash of the inputs. megatron names its cache files after the *paths* it is given, so
    re-preparing a prefix in place would otherwise reuse indices built for the old tokens."""
    h = hashlib.sha256()
    for prefix in prefixes:
        h.update(prefix.encode())
        h.update(Path(prefix + ".idx").read_bytes())
        h.update(str(Path(prefix + ".bin").stat().st_size).encode())
    h.update(tokenizer.fingerprint.encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _rank_zero_without_process_group():
    """megatron-core 0.16.1's ``BlendedDataset._build_indices`` calls ``torch.distributed.get_rank()`` on a
    cache miss without checking ``is_initialized()`` (GPTDataset does check), which raises in a single
    process. Answer 0, the rank it means, only while the datasets are built and only without a process
    group."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


@contextlib.contextmanager
def _one_builder_per_cache(cache_dir: Path):
    """Held by each job's global rank 0 while megatron builds or loads the index caches: megatron writes them
    with ``numpy.save`` in place, so a second job on the same data and cache could load a file that is still
    being written. Its other ranks wait at megatron's own barrier meanwhile. A cache that cannot hold the lock
    file (read-only, only read) or a filesystem without ``flock`` (some parallel filesystems mount without it)
    is used unlocked, as megatron itself would."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        yield
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / ".lock", "a")  # noqa: SIM115 (closed below, after the build)
    except OSError:
        yield
        return
    with lock:
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_datasets(config: DataConfig, train_samples: int, valid_samples: int = 0) -> Datasets:
    """Build (or load from the cache) the train split with ``train_samples`` samples and, when
    ``valid_samples`` > 0, the valid split. Call on every rank; the samples are identical on all of them."""
    if train_samples < 1 or valid_samples < 0:
        raise HypercloneError(f"need train_samples >= 1 and valid_samples >= 0, "
                              f"got {train_samples}, {valid_samples}")
    info = tokenizer_info(config.tokenizer_model)
    prefixes = [str(Path(p).resolve()) for p in config.prefixes]  # cache names must not depend on the cwd
    shares = split_shares(config.split)
    if valid_samples and shares[1] == 0:
        raise HypercloneError(f"split {config.split!r} has no valid share but {valid_samples} valid "
                              f"samples were asked for")
    sizes = [train_samples, valid_samples, 0]

    stats = [inspect_prefix(prefix) for prefix in prefixes]
    for given, s in zip(config.prefixes, stats):
        if s.dtype == "uint16" and info.vocab_size > 65536:
            raise HypercloneError(f"dataset {given} stores uint16 ids but {config.tokenizer_model} has "
                                  f"{info.vocab_size} pieces; prepare it again with this tokenizer")
        _check_split_ranges(given, s.documents, shares, sizes, config.split)
    weights = list(config.weights) if config.weights else None
    if weights is None and len(prefixes) > 1:
        # megatron would blend by sample counts but never repeat an epoch of the blend; token counts give
        # the same proportions and let train_samples exceed one pass.
        weights = [float(s.tokens) for s in stats]

    cache_dir = Path(config.cache_dir).resolve() / _fingerprint(prefixes, info)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    gpt_config = GPTDatasetConfig(
        random_seed=config.seed, sequence_length=config.sequence_length,
        blend=(prefixes, weights if len(prefixes) > 1 else None), split=config.split,
        path_to_cache=str(cache_dir), tokenizer=load_tokenizer(config.tokenizer_model),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,  # the model builds its causal mask; one [seq, seq] per sample is waste
        num_dataset_builder_threads=1, mid_level_dataset_surplus=0.005)
    # Splits nobody reads are dropped from megatron's matrix (the others keep their document ranges): an
    # empty document range would otherwise send GPTDataset's epoch count into an endless loop.
    for i, size in enumerate(sizes):
        if size == 0:
            gpt_config.split_matrix[i] = None
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, gpt_config)
    try:
        with _rank_zero_without_process_group(), _one_builder_per_cache(cache_dir):
            train, valid, _ = builder.build()
    except OSError as exc:
        raise HypercloneError(f"cannot write the dataset index cache under {cache_dir}: "
                              f"{exc.strerror or exc}") from None
    return Datasets(train, valid, cache_dir, info, {g: s.documents for g, s in zip(config.prefixes, stats)})


def _check_split_ranges(prefix: str, num_documents: int, shares: list[float], sizes: list[int],
                        split: str) -> None:
    """Each split that is asked for samples needs at least one document of every prefix (megatron's
    rounding of the share boundaries, reproduced)."""
    bounds = [0.0]
    for share in shares:
        bounds.append(bounds[-1] + share)
    for i, size in enumerate(sizes):
        if size and round(bounds[i + 1] * num_documents) - round(bounds[i] * num_documents) < 1:
            raise HypercloneError(f"split {split!r} leaves the {SPLIT_NAMES[i]} set of {prefix} without "
                                  f"documents ({num_documents} in all); add documents or enlarge the share")


def data_parallel_slice(step: int, global_batch_size: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """(first sample, count) that data-parallel rank ``dp_rank`` reads at ``step``: rank r of d takes the r-th
    contiguous 1/d of global batch ``step``, samples ``[step * gbs, (step + 1) * gbs)``."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise HypercloneError(f"data-parallel rank {dp_rank} is not in [0, {dp_size})")
    if global_batch_size < 1 or global_batch_size % dp_size:
        raise HypercloneError(f"global batch {global_batch_size} does not split over {dp_size} "
                              f"data-parallel ranks")
    if step < 0:
        raise HypercloneError(f"step must be >= 0, got {step}")
    per_rank = global_batch_size // dp_size
    return step * global_batch_size + dp_rank * per_rank, per_rank


def batch_at(dataset, first_sample: int, count: int) -> dict[str, torch.Tensor]:
    """Samples ``[first_sample, first_sample + count)`` stacked: tokens, labels (tokens shifted by one,
    int64), loss_mask (float32), position_ids (int64), each ``[count, sequence_length]``."""
    total = len(dataset)
    if count < 1 or first_sample < 0 or first_sample + count > total:
        raise HypercloneError(f"samples [{first_sample}, {first_sample + count}) are outside the dataset's "
                              f"{total}; build it with more samples")
    samples = [dataset[i] for i in range(first_sample, first_sample + count)]
    return {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}
