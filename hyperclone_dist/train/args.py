"""pretrain.py's command line: the RunConfig (train/run_config.py) from flags and a ``--config`` JSON file.

Flags are Megatron-LM's names where Megatron-LM has the flag, plus short aliases (``--tp``, ``--pp``). A
``--config`` file's keys are flag names (``-`` or ``_``); its values become command-line arguments placed
before the real ones, so argparse checks their types and choices exactly as it checks typed flags, and
the command line wins. Every check that needs no process group happens here, so a bad command fails
identically on every rank before any collective starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from hyperclone_dist.cli.flags import (
    OneLineErrorParser,
    add_growth_flags,
    add_layout_flags,
    growth_spec,
    layout_from_args,
)
from hyperclone_dist.data.tokenizer import HF_TOKENIZER_FILES
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.jsonfile import read_json_object
from hyperclone_dist.train.run_config import SECTIONS, RunConfig

PROG = "pretrain.py"


class _RankZeroErrorParser(OneLineErrorParser):
    """Every rank of a job parses the same command line; only rank 0 prints what is wrong with it."""

    def exit(self, status: int = 0, message: str | None = None):
        if message and os.environ.get("RANK", "0") != "0":
            message = None
        super().exit(status, message)


def _flag_names(f: dataclasses.Field) -> list[str]:
    return list(f.metadata["flags"]) or [f"--{f.name.replace('_', '-')}"]


def _add_section(p: argparse.ArgumentParser, title: str, cls: type) -> None:
    group = p.add_argument_group(title, (cls.__doc__ or "").strip() or None)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "flags" not in f.metadata:
            continue
        kwargs = dict(dest=f.name, default=f.default, help=f.metadata["help"], **f.metadata["argparse"])
        kind = hints[f.name]
        if kind is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
        elif "type" not in kwargs:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            kwargs["type"] = str if typing.get_origin(base) is tuple else base
        group.add_argument(*_flag_names(f), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _RankZeroErrorParser(prog=PROG, description="continue pretraining a grown (or random) model")
    p.add_argument("--config", help="JSON file of flag values (keys are flag names, - or _); flags given here win")
    add_layout_flags(p, "parallelism", megatron_names=True)
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # appended by the deepspeed launcher; LOCAL_RANK is read instead
    for name, cls in SECTIONS.items():
        _add_section(p, name, cls)
    add_growth_flags(p)
    return p


def _config_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A --config file as command-line arguments: ``{"lr": 1e-3, "bf16": true, "data_path": ["a", "b"]}`` is
    ``--lr 0.001 --bf16 --data-path a b``."""
    file = Path(path)
    values = read_json_object(file, "--config")
    actions = {s.lstrip("-").replace("-", "_"): a for a in parser._actions for s in a.option_strings}
    argv: list[str] = []
    for key, value in values.items():
        action = actions.get(key.replace("-", "_"))
        if action is None or action.dest in ("config", "help"):
            raise HypercloneError(f"--config {file}: unknown setting {key!r}")
        option = action.option_strings[0]
        if action.nargs == 0:  # a switch: true turns it on (or, for a --no-x switch, off)
            if not isinstance(value, bool):
                raise HypercloneError(f"--config {file}: {key} must be true or false, got {value!r}")
            if value != action.default:
                argv.append(option)
        elif value is None:
            continue
        elif action.nargs == "+":
            items = value if isinstance(value, list) else [value]
            argv += [option, *map(str, items)]
        elif isinstance(value, (list, dict)):
            argv += [option, json.dumps(value)]  # e.g. --lr-schedule-points
        elif isinstance(value, bool):
            raise HypercloneError(f"--config {file}: {key} takes a value, got {value!r}")
        else:
            argv += [option, str(value)]
    return argv


def _has_tokenizer(path: str | None) -> bool:
    return path is not None and Path(path).is_dir() and any((Path(path) / n).is_file() for n in HF_TOKENIZER_FILES)


def check_tokenizer_given(config: RunConfig) -> None:
    """--data-path names token ids; they mean something only with the tokenizer that made them: given, or the
    model's own (a --clone-from or --load directory that carries one)."""
    data, start = config.data, config.start
    if data.data_path and not data.tokenizer_model and not (_has_tokenizer(start.clone_from)
                                                            or _has_tokenizer(start.load)):
        raise HypercloneError("--data-path needs --tokenizer-model (the tokenizer the data was prepared with; "
                              "a --clone-from model's own is used when it carries one)")


def config_from_namespace(ns: argparse.Namespace) -> RunConfig:
    """The RunConfig of a parsed command line; HypercloneError naming the bad value."""
    sections = {}
    for name, cls in SECTIONS.items():
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if "flags" in f.metadata}
        for key, value in values.items():
            if isinstance(value, list):
                values[key] = tuple(value)
        if cls is SECTIONS["start"]:
            values["growth"] = growth_spec(ns)
        sections[name] = cls(**values)
    return RunConfig(parallel=layout_from_args(ns), **sections)


def parse_args(argv: list[str] | None = None) -> RunConfig:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    try:
        given = list(argv) if argv is not None else None
        if first.config:
            given = _config_argv(parser, first.config) + (given if given is not None else sys.argv[1:])
        config = config_from_namespace(parser.parse_args(given))
        check_tokenizer_given(config)
        return config
    except HypercloneError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
