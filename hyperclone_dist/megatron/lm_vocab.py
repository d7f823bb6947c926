"""The real vocabulary of a checkpoint Megatron-LM wrote, from the tokenizer named in its arguments.

Megatron-LM's embedding and output layer have ``padded_vocab_size`` rows: the tokenizer's size rounded up to a
multiple of ``make_vocab_size_divisible_by x tp``. The rows past the tokenizer's size are never a token, so
they are dropped, as every other source's padding is. The size is what Megatron-LM's tokenizer
(``megatron/training/tokenizer``, ``build_tokenizer``) reports for the ``tokenizer_type`` in the args:

| tokenizer_type                                          | vocabulary size                              |
|---------------------------------------------------------|----------------------------------------------|
| HuggingFaceTokenizer                                    | ``len(tokenizer)`` of ``tokenizer_model``    |
| GPTSentencePieceTokenizer, Llama2Tokenizer              | pieces of the ``tokenizer_model`` file       |
| GPT2BPETokenizer                                        | entries of ``vocab_file``                    |
| NullTokenizer, NullMultimodalTokenizer                  | ``vocab_size`` + 1 (its end-of-document id)  |
| TikTokenizer                                            | ``vocab_size``                               |

Where that cannot be read here (a tokenizer file that did not travel with the checkpoint, a Hub name, another
type), every ``padded_vocab_size`` row is kept: the grown model is still exact, with a vocabulary no smaller
than the tokenizer's; a size is never guessed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hyperclone_dist.data.tokenizer import open_hf_tokenizer, open_sentencepiece, tokenizer_location
from hyperclone_dist.errors import HypercloneError

_FROM_MODEL_FILE = ("HuggingFaceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
_VOCAB_SIZE_PLUS_EOD = ("NullTokenizer", "NullMultimodalTokenizer")


def true_vocab_size(args: argparse.Namespace, where: str | Path = "the checkpoint") -> int:
    """The tokenizer's vocabulary size (see the module docstring), at most ``args.padded_vocab_size``."""
    padded = int(args.padded_vocab_size)
    size = tokenizer_vocab_size(args)
    if size is None:
        return padded
    if size > padded:
        raise HypercloneError(f"{where}: its tokenizer ({args.tokenizer_type}) has {size} tokens but the "
                              f"embedding only {padded} rows (padded_vocab_size)")
    return size


def tokenizer_vocab_size(args: argparse.Namespace) -> int | None:
    """What Megatron-LM's tokenizer of ``args`` reports as its size; None where it cannot be read here."""
    kind = getattr(args, "tokenizer_type", None)
    vocab_size = getattr(args, "vocab_size", None)
    if kind in _VOCAB_SIZE_PLUS_EOD and vocab_size is not None:
        return int(vocab_size) + 1
    if kind == "TikTokenizer" and vocab_size is not None:
        return int(vocab_size)
    if kind == "GPT2BPETokenizer":
        return _json_entries(getattr(args, "vocab_file", None))
    model = getattr(args, "tokenizer_model", None)
    if kind not in _FROM_MODEL_FILE or not model or not Path(model).exists():
        return None
    library, location = tokenizer_location(model)
    if kind == "HuggingFaceTokenizer":
        if library != "huggingface":
            return None
        return len(open_hf_tokenizer(location))
    return open_sentencepiece(location).get_piece_size()


def _json_entries(path: str | None) -> int | None:
    """Entries of GPT-2's ``vocab.json`` (token -> id)."""
    if not path or not Path(path).is_file():
        return None
    try:
        vocab = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HypercloneError(f"cannot read the GPT-2 vocabulary {path}: {exc}") from None
    if not isinstance(vocab, dict):
        raise HypercloneError(f"{path} is not a GPT-2 vocabulary (a JSON object of token ids)")
    return len(vocab)
