"""``torch.load`` that never executes pickled code and reports a bad file in one line."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from hyperclone_dist.errors import HypercloneError

LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, SafetensorError, KeyError)


def first_line(exc: BaseException) -> str:
    """The first sentence of the first line: torch follows its reason with paragraphs of advice."""
    text = str(exc).strip()
    return (text.splitlines()[0].split(". ")[0] if text else type(exc).__name__)[:200]


def torch_load(path: Path, mmap: bool = True) -> object:
    """Load with ``weights_only=True``. ``mmap=False`` for files in torch's legacy (non-zip) serialization,
    which DeepSpeed still writes."""
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
    except LOAD_ERRORS as exc:
        if mmap and "_use_new_zipfile_serialization" in str(exc):  # legacy format (old pytorch_model.bin)
            return torch_load(path, mmap=False)
        raise HypercloneError(f"cannot read {path}: corrupt or truncated ({first_line(exc)})") from None
