"""Where documents come from: user files (.txt, .jsonl, directories, globs) or an embedded default corpus.

The default corpus is the Python standard library's own source (``sysconfig.get_paths()["stdlib"]``,
``*.py``): every machine with Python has it, no download is needed, and it is real text with a long tail.
Files are taken in sorted path order until the byte cap, so a given Python installation always yields the
same corpus (another Python version yields another one).
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hyperclone_dist.errors import HypercloneError

DEFAULT_CORPUS_BYTES = 8_000_000  # ~600 stdlib modules; tokenizing them takes a few seconds on 2 cores
DEFAULT_JSON_KEY = "text"
DIRECTORY_SUFFIXES = (".txt", ".jsonl")  # what a directory input contributes; named files may be any text
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Corpus:
    """A resolved list of files and how to read documents out of them."""

    files: tuple[Path, ...]  # sorted within each input, inputs in the order given
    description: str  # names the inputs in messages, e.g. "a.jsonl, docs/" or "the default corpus (...)"
    json_key: str = DEFAULT_JSON_KEY  # field of each .jsonl line holding the document

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def default_corpus_files(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """The stdlib's ``*.py`` files in sorted order, stopping before the first that would pass ``max_bytes``.

    Package test suites and installed packages are left out (the first are mostly fixtures, the second
    differ between machines); files that are not UTF-8 are skipped.
    """
    if max_bytes <= 0:
        raise HypercloneError(f"the default corpus cap must be positive, got {max_bytes} bytes")
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise HypercloneError(f"the Python standard library is not at {root}; pass --input instead")
    chosen, total = [], 0
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if _SKIPPED_STDLIB_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if total + len(data) > max_bytes:
            break
        chosen.append(path)
        total += len(data)
    if not chosen:
        raise HypercloneError(f"the default corpus cap of {max_bytes} bytes is below the first stdlib file")
    return chosen


def _expand(item: str | Path) -> list[Path]:
    """One input: a file, a directory (its .txt/.jsonl files, recursively), or a glob pattern."""
    path = Path(item)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DIRECTORY_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise HypercloneError(f"input directory {path} holds no {' or '.join(DIRECTORY_SUFFIXES)} files")
        return files
    if _GLOB_CHARS.intersection(str(item)):
        matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
        files = [f for m in matches for f in (_expand(m) if m.is_dir() else [m])]
        if not files:
            raise HypercloneError(f"input pattern {item} matches no file")
        return files
    raise HypercloneError(f"input {path} does not exist")


def resolve_corpus(inputs: Sequence[str | Path] | None, *, json_key: str = DEFAULT_JSON_KEY,
                   default_corpus_bytes: int = DEFAULT_CORPUS_BYTES) -> Corpus:
    """Check every input exists and list its files; no inputs means the default corpus."""
    if not inputs:
        files = default_corpus_files(default_corpus_bytes)
        root = sysconfig.get_paths()["stdlib"]
        return Corpus(tuple(files), f"the default corpus ({len(files)} .py files under {root})", json_key)
    files = [f for item in inputs for f in _expand(item)]
    shown = ", ".join(map(str, inputs[:3])) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
    return Corpus(tuple(files), shown, json_key)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HypercloneError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _jsonl_documents(path: Path, key: str, on_bytes: Callable[[int], None]) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            on_bytes(len(raw))
            line = _decode(raw, f"{path}:{lineno}").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HypercloneError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or key not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise HypercloneError(f"{path}:{lineno} has no key {key!r} (found: {keys or 'nothing'}); "
                                      f"choose the field with --json-key")
            text = record[key]
            if not isinstance(text, str):
                raise HypercloneError(f"{path}:{lineno}: {key!r} holds a {type(text).__name__}, not a string")
            yield text


def iter_documents(corpus: Corpus, on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Every non-blank document in order: one per .jsonl line, one per other file. ``on_bytes`` is told how
    many bytes of input each step consumed (for a progress bar). Raises if the whole corpus is blank."""
    on_bytes = on_bytes or (lambda n: None)
    found = 0
    for path in corpus.files:
        try:
            if path.suffix == ".jsonl":
                docs = _jsonl_documents(path, corpus.json_key, on_bytes)
            else:
                data = path.read_bytes()
                on_bytes(len(data))
                docs = iter([_decode(data, str(path))])
            for text in docs:
                if text.strip():
                    found += 1
                    yield text
        except OSError as exc:
            raise HypercloneError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not found:
        raise HypercloneError(f"no text in {corpus.description}: every document is empty")
