"""``hyperclone data``: train a tokenizer, tokenize a corpus into megatron's indexed format, inspect it.

    hyperclone data tokenizer [--input PATH ...] --out PREFIX [--vocab-size 4096]
    hyperclone data prepare [--input PATH ...] --tokenizer PREFIX.model|HF_DIR|tokenizer.json --out PREFIX
    hyperclone data inspect PREFIX [PREFIX ...] [--tokenizer PREFIX.model|HF_DIR]

Without --input both use the embedded default corpus (the Python standard library's source). A thin layer:
the work is in tokenizer.py, prepare.py and loader.py.
"""

from __future__ import annotations

import argparse

from hyperclone_dist.data.corpus import DEFAULT_CORPUS_BYTES, DEFAULT_JSON_KEY
from hyperclone_dist.data.loader import inspect_prefix, tokenizer_info
from hyperclone_dist.data.prepare import prepare_dataset
from hyperclone_dist.data.tokenizer import DEFAULT_MAX_SENTENCES, DEFAULT_VOCAB_SIZE, SPECIAL_IDS, train_tokenizer


def _add_corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", metavar="PATH",
                   help=".txt (one document per file), .jsonl (one per line), a directory (its .txt and "
                        ".jsonl files, recursively) or a glob; repeatable. Default: the embedded corpus")
    p.add_argument("--json-key", default=DEFAULT_JSON_KEY, help=".jsonl field holding the document text")
    p.add_argument("--default-corpus-mb", type=float, default=DEFAULT_CORPUS_BYTES / 1e6, metavar="MB",
                   help="without --input: stdlib source taken in sorted file order up to this many MB")


def add_data_commands(subparsers) -> None:
    """Add ``data`` and its subcommands to the top-level ``hyperclone`` subparsers."""
    data = subparsers.add_parser("data", help="tokenizer and megatron indexed datasets for pretraining")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{tokenizer,prepare,inspect}")

    p = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer (byte fallback): PREFIX.model")
    _add_corpus_flags(p)
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model (atomically)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--max-sentences", type=int, default=DEFAULT_MAX_SENTENCES,
                   help="lines sampled (seeded) for training; more is slower and rarely better")
    p.add_argument("--seed", type=int, default=0, help="seed of the line sample")

    p = sub.add_parser("prepare", help="tokenize a corpus into a megatron indexed dataset: PREFIX.bin + .idx")
    _add_corpus_flags(p)
    p.add_argument("--tokenizer", required=True, metavar="TOKENIZER",
                   help="PREFIX.model (hyperclone data tokenizer), or a model's own Hugging Face tokenizer: its "
                        "directory or tokenizer.json (documents end with its EOS token)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin, .idx (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: on a terminal only)")

    p = sub.add_parser("inspect", help="documents, tokens and dtype of prepared datasets")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX")
    p.add_argument("--tokenizer", metavar="TOKENIZER", help="also check every id is below its vocab size")


def run_data_command(args: argparse.Namespace) -> int:
    """Run a parsed ``hyperclone data ...``; HypercloneError propagates to main()'s one-line handler."""
    corpus_bytes = int(getattr(args, "default_corpus_mb", 0) * 1e6)
    if args.data_command == "tokenizer":
        r = train_tokenizer(args.input, args.out, args.vocab_size, json_key=args.json_key,
                            max_sentences=args.max_sentences, seed=args.seed,
                            default_corpus_bytes=corpus_bytes)
        print(f"wrote {r.model}: sentencepiece BPE, vocab {r.vocab_size}, byte fallback, "
              f"eod id {SPECIAL_IDS['eos_id']}; "
              f"trained on {r.sentences} lines of {r.documents} documents")
        return 0
    if args.data_command == "prepare":
        r = prepare_dataset(args.input, args.tokenizer, args.out, json_key=args.json_key,
                            default_corpus_bytes=corpus_bytes, progress=False if args.no_progress else None)
        print(f"wrote {r.prefix}.bin, {r.prefix}.idx: {r.documents} documents, {r.tokens} tokens "
              f"({r.dtype}), eod id {r.eod} after each document")
        return 0
    if args.data_command == "inspect":
        info = tokenizer_info(args.tokenizer) if args.tokenizer else None
        for prefix in args.prefixes:
            s = inspect_prefix(prefix, max_token_id=info is not None)
            line = f"{prefix}: {s.documents} documents, {s.tokens} tokens ({s.dtype})"
            if info is not None:
                ok = s.max_token_id < info.vocab_size
                verdict = "OK" if ok else "FAIL"
                print(f"{line}, largest id {s.max_token_id} (vocab {info.vocab_size}) {verdict}")
                if not ok:
                    return 1
            else:
                print(line)
        return 0
    raise AssertionError(args.data_command)
