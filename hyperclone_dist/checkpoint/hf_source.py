"""A Hugging Face model directory (safetensors or pytorch_model.bin, sharded or not) as canonical tensors.

Nothing is read eagerly: safetensors are read tensor by tensor (pread) and a fused HF tensor (GPT-2's
``c_attn``) is split once and its parts served from a one-entry cache, so a converter holds one small
tensor, or one fused HF tensor, at a time. ``.bin`` files are loaded with ``weights_only=True``. The
directory is opened read-only and never modified.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hyperclone_dist.checkpoint.safetensors_pread import DTYPES, SafetensorsData
from hyperclone_dist.checkpoint.source import Source, check_floating, check_shape
from hyperclone_dist.checkpoint.torch_load import first_line, torch_load
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.families import FAMILIES, match_hf_name
from hyperclone_dist.hf_config import config_from_hf
from hyperclone_dist.hf_fusion import hf_shape, split_hf
from hyperclone_dist.jsonfile import read_json_object
from hyperclone_dist.params import canonical_shapes, is_tied_copy, stored_name, stored_shapes

SAFETENSORS_DTYPES = DTYPES  # the floating dtypes a source may hold
_FLOATING = {*SAFETENSORS_DTYPES, *(str(d).removeprefix("torch.") for d in SAFETENSORS_DTYPES.values())}
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def _open_safetensors(file: Path):
    """Read with pread where safetensors offers it: tensors are copied out, so pages of the source already
    grown do not stay resident as they would behind a memory map (see benchmarks/grow_memory.py)."""
    try:
        return safe_open(str(file), framework="pt", backend="pread")
    except TypeError:  # safetensors without the backend keyword
        return safe_open(str(file), framework="pt")


class HFSource(Source):
    kind = "hf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not self.path.is_dir():
            raise HypercloneError(f"no such directory: {self.path}")
        if not config_file.is_file():
            raise HypercloneError(f"{self.path} is not a Hugging Face model directory (no config.json)")
        self.hf_config = read_json_object(config_file, "Hugging Face config")
        self.config = config_from_hf(self.hf_config)
        self.family = FAMILIES[self.config.family]
        self._handles: dict[Path, object] = {}
        self._data_readers: dict[Path, SafetensorsData] = {}
        self._cache: dict[str, torch.Tensor] = {}  # parts of the last fused HF tensor read
        self._where: dict[str, tuple[str, Path, str, tuple[str, ...]]] = {}  # canonical -> (hf name, file, ...)
        for hf_name, file in self._weight_files().items():
            match = match_hf_name(self.family, hf_name)
            if match is None:
                raise HypercloneError(f"{file.name}: tensor {hf_name!r} is not part of a {self.config.family} model")
            for part in match.canonical or ():  # None: a buffer the family drops
                self._where.setdefault(part, (hf_name, file, match.template, match.canonical))
        self._check()
        first = next(iter(stored_shapes(self.config)))  # the embedding
        self.dtype = self._dtype(*self._where[first][:2])

    # ---- files ----------------------------------------------------------------------------------
    def _weight_files(self) -> dict[str, Path]:
        for index_name in _INDEXES:
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise HypercloneError(f"cannot parse {index}: {first_line(exc)}") from None
                files = {name: self.path / file for name, file in weight_map.items()}
                for file in set(files.values()):
                    if not file.is_file():
                        raise HypercloneError(f"{index.name} names {file.name}, which is missing")
                return files
        for single in _SINGLE_FILES:
            file = self.path / single
            if file.is_file():
                return dict.fromkeys(self._handle(file).keys(), file)
        raise HypercloneError(f"{self.path} holds no weights (model.safetensors or pytorch_model.bin)")

    def _handle(self, file: Path):
        if file not in self._handles:
            if file.suffix == ".safetensors":
                try:
                    self._handles[file] = _open_safetensors(file)
                except (SafetensorError, OSError, ValueError) as exc:
                    raise HypercloneError(f"cannot read {file}: corrupt or truncated ({first_line(exc)})") from None
            else:
                state = torch_load(file)
                if not isinstance(state, dict):
                    raise HypercloneError(f"{file} does not hold a state dict")
                self._handles[file] = state
        return self._handles[file]

    def _data(self, file: Path) -> SafetensorsData:
        """The fast reader of a safetensors file, once ``safe_open`` has checked it."""
        self._handle(file)
        if file not in self._data_readers:
            self._data_readers[file] = SafetensorsData(file)
        return self._data_readers[file]

    def _read(self, hf_name: str, file: Path) -> torch.Tensor:
        handle = self._handle(file)
        fast = self._data(file).read(hf_name) if file.suffix == ".safetensors" else None
        if fast is not None:
            return fast
        try:
            tensor = handle.get_tensor(hf_name) if file.suffix == ".safetensors" else handle[hf_name]
        except (SafetensorError, KeyError, OSError, RuntimeError) as exc:
            raise HypercloneError(f"cannot read tensor {hf_name} from {file}: {first_line(exc)}") from None
        if not isinstance(tensor, torch.Tensor):
            raise HypercloneError(f"{file}: entry {hf_name} is not a tensor")
        return tensor

    def _dtype_name(self, hf_name: str, file: Path) -> str:
        """The stored dtype without reading the tensor: the safetensors header's name (e.g. BF16, I64)."""
        if file.suffix == ".safetensors":
            return self._handle(file).get_slice(hf_name).get_dtype()
        return str(self._handle(file)[hf_name].dtype).removeprefix("torch.")

    def _dtype(self, hf_name: str, file: Path) -> torch.dtype:
        if file.suffix == ".safetensors":
            return SAFETENSORS_DTYPES.get(self._dtype_name(hf_name, file), torch.float32)
        return self._handle(file)[hf_name].dtype

    def _shape(self, hf_name: str, file: Path) -> tuple[int, ...]:
        if file.suffix == ".safetensors":
            return tuple(self._handle(file).get_slice(hf_name).get_shape())
        return tuple(self._handle(file)[hf_name].shape)

    # ---- checks ---------------------------------------------------------------------------------
    def _check(self) -> None:
        shapes = canonical_shapes(self.config)
        for name in shapes:
            if name not in self._where and not is_tied_copy(self.config, name):
                raise HypercloneError(f"{self.path}: tensor {name} is missing (the config implies it)")
        others = {}
        for hf_name, file, template, parts in set(self._where.values()):
            check_shape(self.path, hf_name, self._shape(hf_name, file),
                        hf_shape(self.family, template, [shapes[p] for p in parts]))
            dtype = self._dtype_name(hf_name, file)
            if dtype not in _FLOATING:
                others[hf_name] = dtype
        check_floating(self.path, others)

    def _stored(self, name: str) -> str:
        """A tied copy that the directory does not hold itself is read as what it is tied to."""
        return name if name in self._where else stored_name(self.config, name)

    # ---- tensors --------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        name = self._stored(name)
        if name in self._cache:
            return self._cache[name]
        if name not in self._where:
            raise HypercloneError(f"{self.path}: tensor {name} is missing")
        hf_name, file, template, parts = self._where[name]
        parts_map = split_hf(self.family, template, self._read(hf_name, file), parts, self.config)
        self._cache = parts_map if len(parts) > 1 else {}
        return parts_map[name]

    def get_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Safetensors slices read only those rows; fused or transposed HF tensors are cut after reading."""
        name = self._stored(name)
        hf_name, file, template, parts = self._where.get(name, (None, None, None, ()))
        if len(parts) != 1 or template in self.family.transposed or file.suffix != ".safetensors":
            return self.get(name)[lo:hi]
        fast = self._data(file).read(hf_name, (lo, hi))
        if fast is not None:
            return fast
        try:
            return self._handle(file).get_slice(hf_name)[lo:hi]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise HypercloneError(f"cannot read tensor {hf_name} from {file}: {first_line(exc)}") from None
