"""Checksum manifests: every checkpoint directory this tool writes carries ``hyperclone-manifest.json``.

    {"format": "hyperclone-manifest", "version": 2, "algorithm": "xxh3-128",
     "files": {"iter_0000000/__0_0.distcp": {"size": 904143, "hash": "...",
               "tensors": [{"name": "<tensor key>[0:1, 0:176, 0:128]",
                            "offset": 354009, "length": 91689, "hash": "..."}, ...]}, ...}}

Each regular file's size and digest, plus, where the format says where its tensors lie, each tensor's byte
range and its own digest, so that a damaged file is reported with the tensors whose bytes changed:
safetensors (the header's data_offsets), torch.save files in the zip and in the older format (DeepSpeed's
with ``checkpoint_serialization: false``; storages located in the file, named through the pickle), and
PyTorch DCP / megatron-core ``torch_dist`` ``.distcp`` files (the ``.metadata`` storage map). The digests
(checkpoint/digests.py) hash every byte once: a file's digest is derived from its tensors' digests and the
bytes between them. They guard against corruption, not against an adversary. Version-1 manifests (SHA-256
of each file and of each tensor) are still checked.
``check_manifest`` needs only the manifest: it never parses a checkpoint file.

Hand-written: torch, safetensors, megatron-core and DeepSpeed write no checksums of their checkpoints.

    hyperclone inspect --check big/
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hyperclone_dist.checkpoint.atomic import write_bytes_atomic
from hyperclone_dist.checkpoint.digests import ALGORITHM, SHA256, hash_file
from hyperclone_dist.errors import HypercloneError

MANIFEST = "hyperclone-manifest.json"
FORMAT, VERSION = "hyperclone-manifest", 2
ALGORITHMS = {1: SHA256, 2: ALGORITHM}  # the digests of each manifest version this reads
MAX_TENSOR_LINES = 10  # per damaged file; the rest are counted


def _skipped(name: str, is_dir: bool) -> bool:
    """The manifest itself and its temporary file, and directories of unfinished or replaced outputs."""
    if is_dir:
        return name.startswith(".") and (".partial" in name or ".old-" in name)
    return name == MANIFEST or name.startswith(f".{MANIFEST}.")


def list_files(root: Path) -> list[tuple[str, int]]:
    """(relative POSIX path, size) of every regular file under ``root``, sorted; links are not followed."""
    found = []
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _skipped(d, True))
        for name in files:
            path = Path(parent, name)
            if not _skipped(name, False) and path.is_file() and not path.is_symlink():
                found.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return sorted(found)


# ---- where the tensors lie ------------------------------------------------------------------------
def _safetensors_ranges(path: Path) -> list[tuple[str, int, int]]:
    """The header by hand: safetensors' API reads tensors but does not say where their bytes are.
    Layout: 8-byte little-endian header length, the JSON header, then the data the offsets count from."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > path.stat().st_size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(f.read(n))
    return [(name, 8 + n + meta["data_offsets"][0], meta["data_offsets"][1] - meta["data_offsets"][0])
            for name, meta in header.items() if name != "__metadata__"]


class _Storage:
    """A storage's persistent id in a torch.save pickle: ('storage', type, key, location, numel, ...)."""

    def __init__(self, pid):
        self.key, self.numel = str(pid[2]), int(pid[4])
        self.type_name = getattr(pid[1], "global_name", "")  # e.g. torch.FloatStorage


class _Opaque:
    """Whatever a global in the pickle names: built without running anything, its arguments and state kept."""

    global_name = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append((len(self.items), value))

    def extend(self, values):
        for value in values:
            self.append(value)

    add = append


class _OpaqueUnpickler(pickle.Unpickler):
    """Reads a torch.save pickle's structure without importing or calling any of its globals (so DeepSpeed's
    and argparse's classes need no allow-list) and without touching tensor data."""

    def __init__(self, file):
        super().__init__(file)
        self._classes: dict[str, type] = {}
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        key = f"{module}.{name}"
        if key not in self._classes:  # a type, so that NEWOBJ accepts it
            self._classes[key] = type(name, (_Opaque,), {"global_name": key})
        return self._classes[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage = self.storages[str(pid[2])] = _Storage(pid)
        return storage


_REBUILD_TENSOR = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2"}


def _key(key) -> str:
    return str(key) if isinstance(key, (str, int)) else "?"


def _find_tensors(obj, path: tuple, found: list, seen: set) -> None:
    """(dotted path, storage, (storage_offset, size, stride) or None) of every tensor or bare storage."""
    if isinstance(obj, _Storage):
        found.append((".".join(path), obj, None))
        return
    if id(obj) in seen or not isinstance(obj, (dict, list, tuple, _Opaque)):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            _find_tensors(v, (*path, _key(k)), found, seen)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _find_tensors(v, (*path, str(i)), found, seen)
    elif obj.global_name in _REBUILD_TENSOR and len(obj.args) >= 4 and isinstance(obj.args[0], _Storage):
        found.append((".".join(path), obj.args[0], obj.args[1:4]))
    else:  # a Parameter, an OrderedDict, a Namespace: its contents under the same path
        for arg in obj.args:
            _find_tensors(arg, path, found, seen)
        _find_tensors(obj.state, path, found, seen)
        for k, v in obj.items:
            _find_tensors(v, (*path, _key(k)), found, seen)


def _member_data_offset(f, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, whose extra field (torch pads it to
    align the data) may differ from the central directory's."""
    f.seek(info.header_offset)
    local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise ValueError(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _torch_zip_storages(path: Path) -> tuple[object, dict[str, tuple[int, int]]]:
    """torch.save's format: ``<prefix>/data.pkl`` plus one uncompressed member ``<prefix>/data/<key>`` per
    storage. Returns the pickle's structure and each storage key's (data offset, bytes)."""
    with zipfile.ZipFile(path) as z:
        pkl = [i for i in z.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if not pkl:
            raise ValueError("no data.pkl")
        prefix = pkl[0].filename.removesuffix("data.pkl") + "data/"
        members = [i for i in z.infolist() if i.filename.startswith(prefix) and i.compress_type == zipfile.ZIP_STORED]
        with z.open(pkl[0]) as f:
            root = _OpaqueUnpickler(f).load()
    with open(path, "rb") as f:
        return root, {i.filename[len(prefix):]: (_member_data_offset(f, i), i.file_size) for i in members}


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER
_ITEM_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
               "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8}  # torch.<X>Storage element sizes


def _torch_legacy_storages(path: Path) -> tuple[object, dict[str, tuple[int, int]]]:
    """torch.save's older format (DeepSpeed's with ``checkpoint_serialization: false``): pickles of the magic
    number, the protocol, the system info, the object and the list of storage keys, then each storage in that
    order as an 8-byte little-endian element count and its bytes."""
    magic = pickle.dumps(LEGACY_MAGIC, protocol=2)[2:]  # after PROTO n: checked before unpickling anything
    with open(path, "rb") as f:
        if f.read(2 + len(magic))[2:] != magic:
            raise ValueError("not a torch.save file")
        _OpaqueUnpickler(f).load(), _OpaqueUnpickler(f).load()
        unpickler = _OpaqueUnpickler(f)
        root = unpickler.load()
        keys = [str(k) for k in _OpaqueUnpickler(f).load()]
        storages, pos = {}, f.tell()
        for key in keys:
            item = _ITEM_BYTES[unpickler.storages[key].type_name.removeprefix("torch.").removesuffix("Storage")]
            f.seek(pos)
            (numel,) = struct.unpack("<q", f.read(8))
            storages[key] = (pos + 8, numel * item)
            pos += 8 + numel * item
    return root, storages


def _torch_ranges(path: Path, zipped: bool) -> list[tuple[str, int, int]]:
    """Each tensor's range is the part of its storage it spans (a storage shared by views or tied weights
    is hashed once per tensor), named by its path in the saved object."""
    root, storages = (_torch_zip_storages if zipped else _torch_legacy_storages)(path)
    found: list = []
    _find_tensors(root, (), found, set())
    ranges = []
    for name, storage, view in found:
        if storage.key not in storages:
            continue
        start, length = storages[storage.key]
        span = _span(view) if view is not None and storage.numel else None
        if span is not None:
            item = length // storage.numel
            start, length = start + span[0] * item, (span[1] - span[0]) * item
        ranges.append((name or f"storage {storage.key}", start, length))
    return ranges


def _span(view) -> tuple[int, int] | None:
    """Element range [lo, hi) of a storage that a tensor with (storage_offset, size, stride) covers."""
    offset, size, stride = view
    size, stride = (v.args[0] if isinstance(v, _Opaque) and v.args else v for v in (size, stride))
    if not (isinstance(offset, int) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
        return None
    if any(s == 0 for s in size):
        return offset, offset
    return offset, offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))


def _dcp_ranges(checkpoint_dir: Path) -> dict[str, list[tuple[str, int, int]]]:
    """file name -> ranges of a PyTorch DCP checkpoint (megatron-core torch_dist), from ``.metadata``'s
    storage map. Read with DCP's own reader (a plain pickle.load): manifests are written only over files
    this process has just written; checking reads the manifest, never ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint_dir)).read_metadata()
    by_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((chunk_name(metadata, index), info.offset, info.length))
    return by_file


def chunk_name(metadata, index) -> str:
    """A tensor's name, with the slice this chunk holds when the tensor is saved in several chunks."""
    chunks = getattr(metadata.state_dict_metadata.get(index.fqn), "chunks", None)
    if not chunks or len(chunks) == 1 or index.offset is None:
        return index.fqn
    for chunk in chunks:
        if tuple(chunk.offsets) == tuple(index.offset):
            return index.fqn + "[" + ", ".join(f"{o}:{o + n}" for o, n in zip(chunk.offsets, chunk.sizes)) + "]"
    return f"{index.fqn} (chunk at {tuple(index.offset)})"


_PARSE_ERRORS = (ValueError, KeyError, TypeError, IndexError, struct.error, zipfile.BadZipFile, pickle.UnpicklingError,
                 EOFError, AttributeError, RecursionError)


def tensor_ranges(path: Path, dcp_cache: dict) -> list[tuple[str, int, int]]:
    """(name, offset, length) of the tensors in a file whose format locates them; [] for any other file
    (its whole-file digest still guards it)."""
    try:
        if path.suffix == ".safetensors":
            return _safetensors_ranges(path)
        if path.suffix == ".distcp" and (path.parent / ".metadata").is_file():
            if path.parent not in dcp_cache:
                dcp_cache[path.parent] = _dcp_ranges(path.parent)
            return dcp_cache[path.parent].get(path.name, [])
        if path.suffix in (".pt", ".pth", ".bin"):
            return _torch_ranges(path, zipped=zipfile.is_zipfile(path))
    except _PARSE_ERRORS:
        return []
    return []


# ---- hashing ---------------------------------------------------------------------------------------
def file_entries(root: Path, rels: list[str], threads: int = 1) -> dict[str, dict]:
    """Manifest entries of some of ``root``'s files (a share of them, when several processes hash).
    ``threads`` > 1 hashes that many files at once: file reads release the GIL (a file just written is in
    the page cache or on the disk; XXH3 itself, ~25 GB/s a core, is not what a conversion waits for)."""
    dcp_cache: dict = {}
    ranges = {rel: tensor_ranges(root / rel, dcp_cache) for rel in rels}

    def entry(rel: str) -> dict:
        size, digest, digests = hash_file(root / rel, [(o, n) for _, o, n in ranges[rel]])
        found = {"size": size, "hash": digest}
        if ranges[rel]:
            found["tensors"] = [{"name": name, "offset": o, "length": n, "hash": h}
                                for (name, o, n), h in zip(ranges[rel], digests)]
        return found

    largest_first = sorted(rels, key=lambda rel: -(root / rel).stat().st_size)
    with ThreadPoolExecutor(max(1, min(threads, len(rels)))) as pool:
        return dict(zip(largest_first, pool.map(entry, largest_first)))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_manifest(root: Path, entries: dict[str, dict] | None = None,
                   hashed: dict[str, dict] | None = None) -> Path:
    """Write ``root/hyperclone-manifest.json`` atomically: ``entries`` as given, or every file under ``root``
    hashed now, but for the ones in ``hashed`` (entries computed while they were written). Cost: one read of
    the files hashed, each byte hashed once, on every core this process may use."""
    root = Path(root)
    if entries is None:
        hashed = hashed or {}
        rest = [rel for rel, _ in list_files(root) if rel not in hashed]
        entries = {**file_entries(root, rest, threads=usable_cores()), **hashed}
    doc = {"format": FORMAT, "version": VERSION, "algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}
    write_bytes_atomic(root / MANIFEST, (json.dumps(doc, indent=1) + "\n").encode())
    return root / MANIFEST


def write_manifests_together(dirs: list[Path], hashed: list[dict[str, dict]] | None = None) -> None:
    """Collective over the default process group: a manifest in each of ``dirs``. ``hashed``: per dir,
    entries this process computed while writing its files. Every other file is hashed now by one process,
    shared out largest first to the least loaded, and rank 0 writes the manifests. Spread over the job,
    1 TB of state on 64 ranks adds ~20 s, where one hashing rank would hold the others for ~20 min.
    Raises HypercloneError on every rank if any rank failed."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine_hashed = hashed or [{} for _ in dirs]
    all_hashed = [None] * world if rank == 0 else None
    dist.gather_object(mine_hashed, all_hashed, dst=0)
    plan, done = [None], [{} for _ in dirs]
    if rank == 0:  # one process lists the files and deals them out: every rank hashes an agreed share
        done = [{rel: e for h in all_hashed for rel, e in h[d].items()} for d in range(len(dirs))]
        shares, load = [[] for _ in range(world)], [0] * world
        files = [(size, d, rel) for d, root in enumerate(dirs) for rel, size in list_files(root)
                 if rel not in done[d]]
        for size, d, rel in sorted(files, reverse=True):
            k = load.index(min(load))
            shares[k].append((d, rel))
            load[k] += size
        plan = [shares]
    dist.broadcast_object_list(plan, src=0)
    mine: list | str = [{} for _ in dirs]
    try:
        for d, root in enumerate(dirs):
            mine[d] = file_entries(root, [rel for dd, rel in plan[0][rank] if dd == d])
    except OSError as exc:
        mine = f"cannot hash the checkpoint under {dirs[0].parent}: {exc.strerror or exc}"
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    error = [None]
    if rank == 0:
        error = [next((g for g in gathered if isinstance(g, str)), None)]
        if error[0] is None:
            try:
                for d, root in enumerate(dirs):
                    write_manifest(root, {**done[d], **{rel: e for g in gathered for rel, e in g[d].items()}})
            except OSError as exc:
                error = [f"cannot write the checksum manifest under {dirs[0].parent}: {exc.strerror or exc}"]
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise HypercloneError(error[0])


# ---- checking --------------------------------------------------------------------------------------
@dataclass
class ManifestCheck:
    problems: list[str] = field(default_factory=list)  # one line each; any makes the check fail
    warnings: list[str] = field(default_factory=list)  # files the manifest does not list
    files: int = 0
    tensors: int = 0
    nbytes: int = 0


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise HypercloneError(f"{root} has no {MANIFEST} (nothing to check the checkpoint against)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HypercloneError(f"{path} is unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        raise HypercloneError(f"{path} is not a {FORMAT} file")
    if ALGORITHMS.get(doc.get("version")) != doc.get("algorithm"):
        known = ", ".join(f"{v} / {a}" for v, a in ALGORITHMS.items())
        raise HypercloneError(f"{path}: version {doc.get('version')} / {doc.get('algorithm')} is not "
                              f"one this hyperclone reads ({known})")
    for rel, entry in doc["files"].items():
        tensors = entry.get("tensors", []) if isinstance(entry, dict) else None
        if not (_inside(rel) and _valid(entry, {"size": int, "hash": str}) and isinstance(tensors, list)
                and all(_valid(t, {"name": str, "offset": int, "length": int, "hash": str}) for t in tensors)):
            raise HypercloneError(f"{path}: malformed entry for {rel[:80]!r}")
    return doc


def _inside(rel: str) -> bool:
    """A relative path that stays under the checkpoint: a manifest never makes the check read elsewhere."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _valid(entry, fields: dict[str, type]) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in fields.items())


def check_manifest(root: Path, prefix: str = "") -> ManifestCheck:
    """Compare every file under ``root`` with its manifest; ``prefix`` starts each reported path."""
    root = Path(root)
    doc = read_manifest(root)
    files, algorithm = doc["files"], doc["algorithm"]
    result = ManifestCheck()
    present = dict(list_files(root))
    result.warnings += [f"{prefix}{rel}: not in the manifest" for rel in present if rel not in files]
    for rel, entry in files.items():
        where, tensors = f"{prefix}{rel}", entry.get("tensors", [])
        result.files += 1
        result.tensors += len(tensors)
        if rel not in present:
            result.problems.append(f"{where}: missing")
            continue
        if present[rel] != entry["size"]:
            how = "truncated" if present[rel] < entry["size"] else "longer"
            result.problems.append(f"{where}: {present[rel]} bytes, the manifest says {entry['size']} ({how})")
            continue
        try:
            if algorithm == ALGORITHM:  # one read: the file's digest is made of its tensors' and the rest's
                size, digest, digests = hash_file(root / rel, [(t["offset"], t["length"]) for t in tensors])
            else:
                size, digest, digests = hash_file(root / rel, (), algorithm)
            result.nbytes += size
            if digest != entry["hash"]:
                if algorithm != ALGORITHM and tensors:  # version 1: a second read, hashing the tensors
                    digests = hash_file(root / rel, [(t["offset"], t["length"]) for t in tensors], algorithm)[2]
                result.problems += _localise(where, tensors, digests)
        except OSError as exc:
            result.problems.append(f"{where}: unreadable ({exc.strerror or exc})")
    return result


def _localise(where: str, tensors: list[dict], digests: list[str]) -> list[str]:
    """The lines naming the tensors of a damaged file whose ranges no longer match their digests."""
    if not tensors:
        return [f"{where}: does not match its checksum"]
    bad = [t for t, h in zip(tensors, digests) if h != t["hash"]]
    if not bad:
        return [f"{where}: bytes outside its tensors (header, index) do not match the checksum"]
    lines = [f"{where}: tensor {t['name']} (bytes {t['offset']}-{t['offset'] + t['length'] - 1}) does not match "
             "its checksum" for t in bad[:MAX_TENSOR_LINES]]
    if len(bad) > MAX_TENSOR_LINES:
        lines.append(f"{where}: {len(bad) - MAX_TENSOR_LINES} more tensors do not match their checksums")
    return lines
