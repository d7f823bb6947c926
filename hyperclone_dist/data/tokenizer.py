"""Tokenizers: a sentencepiece BPE tokenizer trained here, or a model's own Hugging Face tokenizer (a
directory with ``tokenizer.json`` / ``tokenizer_config.json``, or the ``tokenizer.json`` file itself), both
read back through megatron-core's own tokenizer classes (``MegatronTokenizer``, libraries
``sentencepiece`` and ``huggingface``).

    hyperclone data tokenizer --out data/tok --vocab-size 4096        # the embedded default corpus
    hyperclone data tokenizer --input corpus/ --out data/tok

Training settings, and why:
- byte_fallback: any text encodes, unseen characters as their UTF-8 bytes (no <unk> in the data);
- identity normalization, no whitespace folding, no dummy prefix, whitespace-only pieces allowed, and
  ``\\n`` as a piece of its own: ``decode(encode(text)) == text`` exactly, indentation included;
- fixed ids: <unk> 0, <s> 1, </s> 2 (the end-of-document token appended after every document), <pad> 3;
- a deterministic sample of at most ``max_sentences`` lines (sentencepiece trains on lines), in input
  order, all of which sentencepiece uses unshuffled: the same input gives the same ``.model`` bytes.

``load_tokenizer`` returns megatron-core's ``GPTTokenizer`` over its ``SentencePieceTokenizer`` or
``HuggingFaceTokenizer`` library, the ``MegatronTokenizerBase`` that ``GPTDatasetConfig(tokenizer=...)``
expects. The end of a document is ``</s>`` for ours and the model's EOS token for a Hugging Face one.
sentencepiece and transformers are imported where they are used (transformers takes seconds).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hyperclone_dist.checkpoint.atomic import write_file_atomic
from hyperclone_dist.data.corpus import DEFAULT_CORPUS_BYTES, DEFAULT_JSON_KEY, iter_documents, resolve_corpus
from hyperclone_dist.errors import HypercloneError

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MAX_SENTENCES = 300_000  # lines sampled for training: ~2 s for vocab 4096 on 2 cores
MAX_SENTENCE_BYTES = 16_384  # longer lines are left out of training (they still encode)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_IDS) + 1  # every byte, the specials, "\n"


@dataclass(frozen=True)
class TrainedTokenizer:
    model: Path  # PREFIX.model
    vocab_size: int
    documents: int  # non-empty documents read
    sentences: int  # lines sentencepiece trained on


SENTENCEPIECE, HUGGINGFACE = "sentencepiece", "huggingface"  # megatron-core's names of the two libraries
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TokenizerInfo:
    """What the trainer needs from the tokenizer: embedding rows and the special ids."""

    model: Path  # the .model file, or the Hugging Face tokenizer's directory
    vocab_size: int  # before any padding to a multiple for tensor parallelism
    eod: int  # appended after every document by `hyperclone data prepare`
    bos: int  # -1 when there is none
    pad: int  # -1 when the model has no pad piece
    library: str = SENTENCEPIECE  # sentencepiece | huggingface

    @property
    def fingerprint(self) -> str:
        """A hash of the files that define the tokenizer (dataset caches depend on it)."""
        h = hashlib.sha256()
        for file in tokenizer_files(self.model):
            h.update(file.name.encode() + file.read_bytes())
        return h.hexdigest()


def _sample_lines(documents: Iterable[str], max_sentences: int, seed: int) -> tuple[list[str], int]:
    """Reservoir-sample non-blank lines (seeded, so deterministic); returns them in input order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    seen = docs = 0
    for doc in documents:
        docs += 1
        for line in doc.split("\n"):
            if not line.strip() or len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                continue
            if len(reservoir) < max_sentences:
                reservoir.append((seen, line))
            else:
                j = rng.randrange(seen + 1)
                if j < max_sentences:
                    reservoir[j] = (seen, line)
            seen += 1
    reservoir.sort()
    return [line for _, line in reservoir], docs


def _sentencepiece_message(exc: Exception) -> str:
    """sentencepiece's errors start with a C++ source location; keep the sentence after it, on one line."""
    text = " ".join(str(exc).split())
    match = re.match(r"^.*?\.cc\(\d+\) \[(.*)\]\s*(.*)$", text)
    if match:
        return match.group(2) or f"check failed: {match.group(1)}"
    return text or type(exc).__name__


def train_tokenizer_on_documents(documents: Iterable[str], out_prefix: str | Path,
                                 vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                                 max_sentences: int = DEFAULT_MAX_SENTENCES, seed: int = 0,
                                 source: str = "the documents") -> TrainedTokenizer:
    """Train on an iterable of documents and write ``{out_prefix}.model`` atomically."""
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB_SIZE:
        raise HypercloneError(f"--vocab-size {vocab_size} is too small: byte fallback needs at least "
                              f"{MIN_VOCAB_SIZE} pieces")
    if max_sentences < 1:
        raise HypercloneError(f"max_sentences must be >= 1, got {max_sentences}")
    model = Path(f"{out_prefix}.model")
    lines, docs = _sample_lines(documents, max_sentences, seed)
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"], character_coverage=0.9995, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=min(8, os.cpu_count() or 1), minloglevel=2, **SPECIAL_IDS)
    except (RuntimeError, OSError) as exc:
        raise HypercloneError(f"sentencepiece cannot train a {vocab_size}-piece vocabulary on {source}: "
                              f"{_sentencepiece_message(exc)}") from None
    write_file_atomic(model, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return TrainedTokenizer(model, vocab_size, docs, len(lines))


def train_tokenizer(inputs: Sequence[str | Path] | None, out_prefix: str | Path,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, *, json_key: str = DEFAULT_JSON_KEY,
                    max_sentences: int = DEFAULT_MAX_SENTENCES, seed: int = 0,
                    default_corpus_bytes: int = DEFAULT_CORPUS_BYTES) -> TrainedTokenizer:
    """Train on ``inputs`` (files, directories, globs; None: the default corpus): ``{out_prefix}.model``."""
    corpus = resolve_corpus(inputs, json_key=json_key, default_corpus_bytes=default_corpus_bytes)
    return train_tokenizer_on_documents(iter_documents(corpus), out_prefix, vocab_size,
                                        max_sentences=max_sentences, seed=seed, source=corpus.description)


def open_sentencepiece(model: str | Path):
    """The raw processor, or a one-line error for a missing, unreadable or non-sentencepiece file."""
    import sentencepiece as spm

    model = Path(model)
    if not model.exists():
        raise HypercloneError(f"tokenizer model {model} does not exist "
                              f"(train one with hyperclone data tokenizer)")
    if not model.is_file():
        raise HypercloneError(f"tokenizer model {model} is not a file")
    try:
        processor = spm.SentencePieceProcessor(model_proto=model.read_bytes())
    except OSError as exc:
        raise HypercloneError(f"cannot read tokenizer model {model}: {exc.strerror or exc}") from None
    except (RuntimeError, ValueError):  # sentencepiece names only its C++ parse call
        raise HypercloneError(f"{model} is not a sentencepiece model (it does not parse as one)") from None
    if processor.get_piece_size() < 1 or processor.eos_id() < 0:
        raise HypercloneError(f"tokenizer model {model} has no end-of-document piece (</s>)")
    return processor


def tokenizer_location(path: str | Path) -> tuple[str, Path]:
    """(library, path megatron-core loads it from) of a tokenizer given as a sentencepiece ``.model``, a
    Hugging Face tokenizer directory (a model directory holds one), or its ``tokenizer.json``."""
    path = Path(path)
    if path.is_dir():
        if not any((path / name).is_file() for name in HF_TOKENIZER_FILES):
            raise HypercloneError(f"{path} holds no Hugging Face tokenizer (no {' or '.join(HF_TOKENIZER_FILES)})")
        return HUGGINGFACE, path
    if path.name in HF_TOKENIZER_FILES:
        if not path.is_file():
            raise HypercloneError(f"tokenizer {path} does not exist")
        return HUGGINGFACE, path.parent
    return SENTENCEPIECE, path


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files a tokenizer consists of."""
    library, where = tokenizer_location(path)
    if library == SENTENCEPIECE:
        return [where]
    return sorted(f for f in where.iterdir() if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens",
                                                                                   "added_tokens", "vocab", "merges"))))


def open_hf_tokenizer(directory: Path):
    """transformers' tokenizer of ``directory``, or a one-line error naming what is wrong with it."""
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        text = str(exc).strip().splitlines()
        raise HypercloneError(f"cannot read the Hugging Face tokenizer in {directory}: "
                              f"{(text[0] if text else type(exc).__name__)[:200]}") from None
    if tokenizer.eos_token_id is None:
        raise HypercloneError(f"the tokenizer in {directory} has no end-of-sequence token to end documents with")
    return tokenizer


def tokenizer_info(model: str | Path) -> TokenizerInfo:
    """Vocab size and special ids of a tokenizer (sentencepiece: without importing megatron-core)."""
    library, where = tokenizer_location(model)
    if library == HUGGINGFACE:
        tok = open_hf_tokenizer(where)
        return TokenizerInfo(where, len(tok), tok.eos_token_id, _id(tok.bos_token_id), _id(tok.pad_token_id),
                             HUGGINGFACE)
    sp = open_sentencepiece(where)
    return TokenizerInfo(where, sp.get_piece_size(), sp.eos_id(), sp.bos_id(), sp.pad_id())


def _id(value: int | None) -> int:
    return -1 if value is None else int(value)


def batch_encoder(model: str | Path):
    """``encode(texts) -> [ids, ...]``: each text's ids without special tokens, what megatron-core's
    tokenizer's ``text_to_ids`` gives (a test checks it), encoded a batch at a time on every core."""
    library, where = tokenizer_location(model)
    if library == HUGGINGFACE:
        tok = open_hf_tokenizer(where)
        return lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
    sp = open_sentencepiece(where)
    return lambda texts: sp.encode(texts, num_threads=os.cpu_count() or 1)


def load_tokenizer(model: str | Path):
    """megatron-core's ``GPTTokenizer`` (a ``MegatronTokenizerBase``) over the tokenizer at ``model``.

    The path is made absolute: it is part of the identity megatron hashes into its index-cache names, which
    must not depend on the working directory of each rank.
    """
    library, where = tokenizer_location(model)
    tokenizer_info(where if library == HUGGINGFACE else model)  # one-line errors before megatron's asserts
    from megatron.core.tokenizers import MegatronTokenizer  # heavy: imported once a dataset is built

    return MegatronTokenizer.from_pretrained(str(where.resolve()), metadata_path={"library": library,
                                                                                   "model_type": "gpt"})
