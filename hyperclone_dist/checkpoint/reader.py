"""Open a small checkpoint (HF model directory or our single-file small.pt) as canonical tensors.

Nothing is read eagerly: safetensors are memory-mapped and tensors are materialised one at a time, so
a converter holds one small tensor (or one fused HF tensor) at a time. Pickled files are only ever
loaded with ``weights_only=True``; the source is opened read-only and never modified.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hyperclone_dist.checkpoint import small_pt
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.families import FAMILIES, family_of, match_hf_name
from hyperclone_dist.hf_config import config_from_hf
from hyperclone_dist.jsonfile import read_json_object
from hyperclone_dist.layout import hf_shape, split_hf
from hyperclone_dist.params import canonical_shapes

_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, SafetensorError, KeyError)


def torch_load(path: Path, mmap: bool = True) -> object:
    """``torch.load`` that never executes pickled code and reports a bad file in one line. ``mmap=False``
    for files in torch's legacy (non-zip) serialization, which DeepSpeed still writes."""
    try:
        with warnings.catch_warnings():  # a protocol the safe unpickler may not know: it refuses in one line below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text)  # torch < 2.7 and later wording
        reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)  # e.g. an opcode it does not allow
        first = (f"it names {found.group(1)}" if found else reason.group(1)[:160] if reason
                 else (text.strip().splitlines()[0] if text.strip() else type(exc).__name__)[:160])
        raise HypercloneError(
            f"refusing to load {path}: it is not a plain tensor checkpoint ({first}); "
            "nothing in it was executed") from None
    except _LOAD_ERRORS as exc:
        if mmap and "_use_new_zipfile_serialization" in str(exc):  # legacy format (old pytorch_model.bin)
            return torch_load(path, mmap=False)
        raise HypercloneError(f"cannot read {path}: corrupt or truncated ({_first_line(exc)})") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _open_safetensors(file: Path):
    """Read with pread where safetensors offers it: tensors are copied out, so pages of the source already
    grown do not stay resident as they would behind a memory map (see benchmarks/grow_memory.py)."""
    try:
        return safe_open(str(file), framework="pt", backend="pread")
    except TypeError:  # safetensors without the backend keyword
        return safe_open(str(file), framework="pt")


def _first_line(exc: BaseException) -> str:
    """The first sentence of the first line: torch follows its reason with paragraphs of advice."""
    text = str(exc).strip()
    return (text.splitlines()[0].split(". ")[0] if text else type(exc).__name__)[:200]


class SourceCheckpoint:
    """Canonical view of a small model: ``config``, ``shapes`` and ``get(name)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise HypercloneError(f"no such file or directory: {self.path}")
        self._cache: dict[str, torch.Tensor] = {}  # parts of the last fused HF tensor read
        if self.path.is_dir():
            self.kind = "hf"
            self._open_hf()
        else:
            self.kind = "small.pt"
            self._open_small_pt()
        self.shapes = canonical_shapes(self.config)
        self._check_shapes()
        self._check_dtypes()

    # ---- HF directories -------------------------------------------------------------------------
    def _open_hf(self) -> None:
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise HypercloneError(f"{self.path} is not a Hugging Face model directory (no config.json)")
        hf = read_json_object(config_file, "Hugging Face config")
        self.config: ModelConfig = config_from_hf(hf)
        self.family = FAMILIES[self.config.family]
        self.hf_config = hf
        self._handles: dict[Path, object] = {}
        self._files = self._hf_weight_files()
        self._where: dict[str, tuple[str, Path, str, tuple[str, ...]]] = {}  # canonical -> hf name etc.
        self._hf_shapes: dict[str, tuple[int, ...]] = {}
        for hf_name, file in self._files.items():
            match = match_hf_name(self.family, hf_name)
            if match is None:
                raise HypercloneError(
                    f"{file.name}: tensor {hf_name!r} is not part of a {self.config.family} model")
            if match.canonical is None:
                continue
            for part in match.canonical:
                self._where.setdefault(part, (hf_name, file, match.template, match.canonical))
        self.dtype = self._peek_dtype()

    def _hf_weight_files(self) -> dict[str, Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise HypercloneError(f"cannot parse {index}: {_first_line(exc)}") from None
                files = {name: self.path / file for name, file in weight_map.items()}
                for file in set(files.values()):
                    if not file.is_file():
                        raise HypercloneError(f"{index.name} names {file.name}, which is missing")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            file = self.path / single
            if file.is_file():
                return {name: file for name in self._list_names(file)}
        raise HypercloneError(f"{self.path} holds no weights (model.safetensors or pytorch_model.bin)")

    def _handle(self, file: Path):
        if file not in self._handles:
            if file.suffix == ".safetensors":
                try:
                    self._handles[file] = _open_safetensors(file)
                except (SafetensorError, OSError, ValueError) as exc:
                    raise HypercloneError(f"cannot read {file}: corrupt or truncated ({_first_line(exc)})") from None
            else:
                state = torch_load(file)
                if not isinstance(state, dict):
                    raise HypercloneError(f"{file} does not hold a state dict")
                self._handles[file] = state
        return self._handles[file]

    def _list_names(self, file: Path) -> list[str]:
        handle = self._handle(file)
        return list(handle.keys())

    def _read_hf(self, hf_name: str, file: Path) -> torch.Tensor:
        handle = self._handle(file)
        try:
            tensor = handle.get_tensor(hf_name) if file.suffix == ".safetensors" else handle[hf_name]
        except (SafetensorError, KeyError, OSError, RuntimeError) as exc:
            raise HypercloneError(f"cannot read tensor {hf_name} from {file}: {_first_line(exc)}") from None
        if not isinstance(tensor, torch.Tensor):
            raise HypercloneError(f"{file}: entry {hf_name} is not a tensor")
        return tensor

    def _peek_dtype(self) -> torch.dtype:
        name, file, *_ = self._where.get("embed.weight") or next(iter(self._where.values()))
        if file.suffix == ".safetensors":
            return _SAFETENSORS_DTYPES.get(self._handle(file).get_slice(name).get_dtype(), torch.float32)
        return self._read_hf(name, file).dtype

    # ---- small.pt -------------------------------------------------------------------------------
    def _open_small_pt(self) -> None:
        payload = torch_load(self.path)
        self.config, self._state, self.meta = small_pt.unpack(payload, self.path)
        self.family = family_of(self.config.family)
        self.hf_config = None
        self.dtype = self._state["embed.weight"].dtype

    # ---- common ---------------------------------------------------------------------------------
    def _check_shapes(self) -> None:
        for name in self.shapes:
            if not self._has(name) and not (name == "head.weight" and self.config.tie_word_embeddings):
                raise HypercloneError(f"{self.path}: tensor {name} is missing (the config implies it)")
        if self.kind == "small.pt":
            extra = sorted(set(self._state) - set(self.shapes))
            if extra:
                raise HypercloneError(f"{self.path}: unexpected tensors {extra[:3]} for this config")
            stored = {name: (name, tuple(t.shape), self.shapes[name]) for name, t in self._state.items()}
        else:
            stored = {}
            for hf_name, file, template, parts in set(self._where.values()):
                expected = hf_shape(self.family, template, [self.shapes[p] for p in parts])
                stored[hf_name] = (hf_name, self._hf_tensor_shape(hf_name, file), expected)
        for hf_name, have, want in stored.values():
            if have != tuple(want):
                raise HypercloneError(
                    f"{self.path}: tensor {hf_name} has shape {list(have)}, the config implies {list(want)}")

    def _check_dtypes(self) -> None:
        """Weights are floating point: an integer tensor means a quantized or foreign checkpoint, and
        growing it would silently write its integers as weights."""
        if self.kind == "small.pt":
            found = {name: str(t.dtype).removeprefix("torch.") for name, t in self._state.items()
                     if not t.dtype.is_floating_point}
        else:
            found = {}
            for hf_name, file, *_ in set(self._where.values()):
                handle = self._handle(file)
                if file.suffix == ".safetensors":  # the header's name, e.g. I64
                    dtype = handle.get_slice(hf_name).get_dtype()
                    floating = dtype in _SAFETENSORS_DTYPES
                else:
                    dtype = str(handle[hf_name].dtype).removeprefix("torch.")
                    floating = handle[hf_name].is_floating_point()
                if not floating:
                    found[hf_name] = dtype
        if found:
            name = min(found)
            raise HypercloneError(f"{self.path}: tensor {name} has dtype {found[name]} ({len(found)} such "
                                  "tensors); only floating-point weights (float32, bfloat16, float16) can be grown")

    def _hf_tensor_shape(self, hf_name: str, file: Path) -> tuple[int, ...]:
        handle = self._handle(file)
        if file.suffix == ".safetensors":
            return tuple(handle.get_slice(hf_name).get_shape())
        return tuple(handle[hf_name].shape)

    def get(self, name: str) -> torch.Tensor:
        """One canonical tensor of the small model, [out, in] orientation, in its stored dtype."""
        name = self._stored_name(name)
        if self.kind == "small.pt":
            if name not in self._state:
                raise HypercloneError(f"{self.path}: tensor {name} is missing")
            return self._state[name]
        if name in self._cache:
            return self._cache[name]
        if name not in self._where:
            raise HypercloneError(f"{self.path}: tensor {name} is missing")
        hf_name, file, template, parts = self._where[name]
        parts_map = split_hf(self.family, template, self._read_hf(hf_name, file), parts, self.config)
        self._cache = parts_map if len(parts) > 1 else {}
        return parts_map[name]

    def get_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of a canonical tensor, read without materialising the rest where the storage
        allows (safetensors slices, memory-mapped small.pt); fused or transposed HF tensors are cut."""
        name = self._stored_name(name)
        if self.kind == "small.pt":
            return self.get(name)[lo:hi]
        hf_name, file, template, parts = self._where.get(name, (None, None, None, ()))
        if len(parts) != 1 or template in self.family.transposed or file.suffix != ".safetensors":
            return self.get(name)[lo:hi]
        try:
            return self._handle(file).get_slice(hf_name)[lo:hi]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise HypercloneError(f"cannot read tensor {hf_name} from {file}: {_first_line(exc)}") from None

    def _stored_name(self, name: str) -> str:
        """A tied head is stored as the embedding."""
        if name == "head.weight" and self.config.tie_word_embeddings and not self._has(name):
            return "embed.weight"
        return name

    def _has(self, name: str) -> bool:
        return name in (self._state if self.kind == "small.pt" else self._where)

    @property
    def nbytes(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        stored = canonical_shapes(self.config, with_head=not self.config.tie_word_embeddings)
        return sum(element * torch.Size(s).numel() for s in stored.values())
