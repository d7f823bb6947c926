"""Tokenize a corpus into megatron-core's indexed dataset: ``PREFIX.bin`` (token ids) + ``PREFIX.idx``.

    hyperclone data prepare --tokenizer data/tok.model --out data/stdlib            # the default corpus
    hyperclone data prepare --input corpus.jsonl --json-key text --tokenizer data/tok.model --out data/web
    hyperclone data prepare --input corpus/ --tokenizer path/to/hf-model --out data/web  # the model's own

One entry per document (a sequence of one document, as Megatron-LM's ``preprocess_data.py`` writes without
sentence splitting), the tokenizer's end-of-document id appended to each, written by megatron-core's own
``IndexedDatasetBuilder`` with the smallest dtype of its format that holds the vocabulary: uint16 below 65500
pieces, else int32 (megatron's indexed format has no uint32; int32 holds any vocabulary below 2^31).
Documents are encoded a batch at a time (data/tokenizer.py ``batch_encoder``): the same ids as megatron's
tokenizer's ``text_to_ids``, no special tokens, the end-of-document id (the model's EOS) after each.

Both files are built under hidden temporary names and renamed when complete, ``.idx`` last: a reader finds
the old pair, no pair, or the new pair, never a torn one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyperclone_dist.checkpoint.atomic import NOTHING_KEPT, one_line_os_errors, partial_path, publish_files
from hyperclone_dist.data.corpus import DEFAULT_CORPUS_BYTES, DEFAULT_JSON_KEY, iter_documents, resolve_corpus
from hyperclone_dist.data.tokenizer import batch_encoder, tokenizer_info
from hyperclone_dist.progress import progress_bar

BATCH_BYTES = 4_000_000  # text encoded per tokenizer call (threads split a batch by document)


@dataclass(frozen=True)
class PreparedDataset:
    prefix: Path  # PREFIX of PREFIX.bin / PREFIX.idx
    documents: int
    tokens: int  # end-of-document tokens included
    dtype: str  # numpy dtype of the token ids in PREFIX.bin
    eod: int


def prepare_dataset(inputs: Sequence[str | Path] | None, tokenizer_model: str | Path,
                    out_prefix: str | Path, *, json_key: str = DEFAULT_JSON_KEY,
                    default_corpus_bytes: int = DEFAULT_CORPUS_BYTES,
                    progress: bool | None = None) -> PreparedDataset:
    """Tokenize ``inputs`` (files, directories, globs; None: the default corpus) into ``out_prefix``.

    ``progress``: a tqdm bar over input bytes on stderr when it is a terminal (None or True); False: none.
    """
    corpus = resolve_corpus(inputs, json_key=json_key, default_corpus_bytes=default_corpus_bytes)
    info = tokenizer_info(tokenizer_model)  # checks the tokenizer before megatron-core is imported
    encode = batch_encoder(tokenizer_model)

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = Path(out_prefix)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    dtype = DType.optimal_dtype(info.vocab_size)
    eod = info.eod
    documents = tokens = 0

    def write(batch: list[str]) -> None:
        nonlocal documents, tokens
        for ids in encode(batch):
            ids = np.asarray(ids + [eod], dtype=dtype)
            builder.add_document(ids, [ids.size])
            documents += 1
            tokens += ids.size

    with one_line_os_errors(bin_path, NOTHING_KEPT):
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp_bin, tmp_idx = partial_path(bin_path), partial_path(idx_path)
        builder = None
        try:
            builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
            with progress_bar(total=corpus.total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {prefix.name}",
                              enabled=progress is not False) as bar:
                batch, size = [], 0
                for text in iter_documents(corpus, bar.update):
                    batch.append(text)
                    size += len(text)
                    if size >= BATCH_BYTES:
                        write(batch)
                        batch, size = [], 0
                write(batch)
            builder.finalize(str(tmp_idx))
            publish_files([(tmp_bin, bin_path), (tmp_idx, idx_path)])
        finally:
            if builder is not None:
                builder.data_file.close()  # already closed by finalize() unless a document failed
            tmp_bin.unlink(missing_ok=True)
            tmp_idx.unlink(missing_ok=True)
    return PreparedDataset(prefix, documents, tokens, np.dtype(dtype).name, eod)
