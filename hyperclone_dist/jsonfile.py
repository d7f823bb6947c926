"""Reading a JSON object a user points at (flag files, DeepSpeed configs, model descriptions), with one-line
errors that say which file and what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path

from hyperclone_dist.errors import HypercloneError


def read_json_object(path: str | Path, what: str) -> dict:
    """``what`` names the file in messages, e.g. "DeepSpeed config" or "--config"."""
    file = Path(path)
    if not file.is_file():
        raise HypercloneError(f"{what} {file} does not exist")
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HypercloneError(f"cannot parse {what} {file}: {exc}") from None
    if not isinstance(value, dict):
        raise HypercloneError(f"{what} {file} does not hold a JSON object")
    return value
