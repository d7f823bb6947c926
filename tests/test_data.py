"""The pretraining data pipeline: default corpus, sentencepiece tokenizer, megatron indexed datasets, blended
train/valid datasets in one process and under torchrun, and ``hyperclone data`` bad inputs."""

from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from warm import hyperclone_in_process

from hyperclone_dist.data.corpus import default_corpus_files, iter_documents, resolve_corpus
from hyperclone_dist.data.loader import (
    DataConfig,
    batch_at,
    build_datasets,
    data_parallel_slice,
    inspect_prefix,
)
from hyperclone_dist.data.prepare import prepare_dataset
from hyperclone_dist.data.tokenizer import load_tokenizer, open_sentencepiece, tokenizer_info, train_tokenizer
from hyperclone_dist.errors import HypercloneError

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = REPO / "tests" / "mp_workers" / "data_ranks.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
BAD_INPUT = 2
CORPUS_BYTES = 1_000_000  # a 1 MB slice of the default corpus keeps training and tokenizing under a second
VOCAB = 1024
SAMPLES = [
    "def f(x):\n\tif x:\n        return 'héllo wörld'  # trailing  spaces  \n\n",
    "Ünïcödé, 日本語, emoji 🙂🚀, math ∑∫, and a NUL-free control \x07 bell\r\n",
    "    leading indentation, 12345 digits, and\n\n\nblank lines",
]


def _words_doc(rng: random.Random, words: list[str]) -> str:
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(2, 8))]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer trained on 1 MB of the default corpus; two prepared prefixes: that corpus slice (45
    documents) and 80 synthetic .jsonl documents."""
    root = tmp_path_factory.mktemp("data")
    tok = train_tokenizer(None, root / "tok", VOCAB, default_corpus_bytes=CORPUS_BYTES).model
    rng = random.Random(0)
    words = sorted(set(" ".join(SAMPLES).split()) | set(dir(__builtins__)))
    with open(root / "words.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "text": _words_doc(rng, words)}) + "\n" for i in range(80))
    prepare_dataset(None, tok, root / "ds" / "stdlib", default_corpus_bytes=CORPUS_BYTES, progress=False)
    prepare_dataset([root / "words.jsonl"], tok, root / "ds" / "words", progress=False)
    return {"root": root, "tok": tok, "stdlib": root / "ds" / "stdlib", "words": root / "ds" / "words"}


def test_default_corpus_is_sorted_stdlib_source_under_the_cap():
    files = default_corpus_files(CORPUS_BYTES)
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(stdlib).as_posix() for f in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any(part in ("site-packages", "test", "tests") for r in rel for part in r.split("/")[:-1])
    total = sum(f.stat().st_size for f in files)
    assert CORPUS_BYTES * 0.8 < total <= CORPUS_BYTES
    assert default_corpus_files(CORPUS_BYTES) == files
    assert files == default_corpus_files(2 * CORPUS_BYTES)[:len(files)]  # a larger cap extends the same list


def test_tokenizer_round_trips_any_text_exactly(data):
    info = tokenizer_info(data["tok"])
    assert (info.vocab_size, info.eod, info.bos, info.pad) == (VOCAB, 2, 1, 3)
    sp = open_sentencepiece(data["tok"])
    megatron_tok = load_tokenizer(data["tok"])  # what GPTDatasetConfig gets
    assert (megatron_tok.vocab_size, megatron_tok.eod, megatron_tok.pad) == (VOCAB, 2, 3)
    for text in SAMPLES:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert megatron_tok.tokenize(text) == ids  # prepare.py encodes with sentencepiece directly
        assert megatron_tok.detokenize(ids) == text
        assert 0 not in ids  # byte fallback: never <unk>
    assert sp.id_to_piece(sp.encode("a\nb")[1]) == "\n"


def test_tokenizer_round_trips_the_default_corpus_and_compresses_it(data):
    sp = open_sentencepiece(data["tok"])
    docs = list(iter_documents(resolve_corpus(None, default_corpus_bytes=CORPUS_BYTES)))
    ids = sp.encode(docs)
    assert [sp.decode(i) for i in ids] == docs
    chars, tokens = sum(map(len, docs)), sum(map(len, ids))
    assert chars / tokens > 2.5, f"{chars / tokens:.2f} characters per token: the BPE merges learned little"


def test_tokenizer_training_is_deterministic(tmp_path):
    docs = [_words_doc(random.Random(i), SAMPLES[0].split() + SAMPLES[2].split()) for i in range(200)]
    first = train_tokenizer(None, tmp_path / "a", 400, default_corpus_bytes=300_000).model.read_bytes()
    again = train_tokenizer(None, tmp_path / "b", 400, default_corpus_bytes=300_000).model.read_bytes()
    assert first == again
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(doc)
    sampled = [train_tokenizer([tmp_path / "docs"], tmp_path / f"s{seed}", 300, max_sentences=150, seed=seed)
               for seed in (0, 0, 1)]
    assert sampled[0].sentences == 150 and sampled[0].documents == 200
    blobs = [s.model.read_bytes() for s in sampled]
    assert blobs[0] == blobs[1] and blobs[0] != blobs[2]  # the line sample follows the seed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial files


def test_prepare_writes_megatron_indexed_dataset(data, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(SAMPLES[0])
    (src / "b.txt").write_text("   \n")  # blank: skipped
    lines = [json.dumps({"text": SAMPLES[1]}), "", json.dumps({"text": SAMPLES[2]})]  # a blank line between
    (src / "sub" / "c.jsonl").write_text("\n".join(lines))
    (src / "notes.md").write_text("not read: directories contribute .txt and .jsonl only")
    result = prepare_dataset([src], data["tok"], tmp_path / "out" / "p", progress=False)
    assert (result.documents, result.dtype, result.eod) == (3, "uint16", 2)

    ds = IndexedDataset(str(tmp_path / "out" / "p"))
    sp = open_sentencepiece(data["tok"])
    assert len(ds) == 3 and ds.index.dtype == np.uint16
    assert list(ds.document_indices) == [0, 1, 2, 3]  # one sequence per document
    for entry, text in zip([ds[i] for i in range(3)], [SAMPLES[0], SAMPLES[1], SAMPLES[2]]):
        assert entry[-1] == 2 and 2 not in entry[:-1]
        assert sp.decode(entry[:-1].tolist()) == text
    assert int(ds.sequence_lengths.sum()) == result.tokens
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.bin", "p.idx"]  # no partial files left

    (src / "a.txt").write_text("replaced")
    prepare_dataset([src / "a.txt"], data["tok"], tmp_path / "out" / "p", progress=False)
    assert len(IndexedDataset(str(tmp_path / "out" / "p"))) == 1


def _config(data, tmp_path, seed=1, cache="cache", **kw) -> DataConfig:
    return DataConfig(prefixes=(str(data["stdlib"]), str(data["words"])), weights=(0.7, 0.3),
                      tokenizer_model=str(data["tok"]), cache_dir=str(tmp_path / cache), split="80,20,0",
                      sequence_length=32, seed=seed, **kw)


def test_blend_and_split_are_deterministic_per_seed(data, tmp_path):
    a = build_datasets(_config(data, tmp_path, cache="c1"), train_samples=100, valid_samples=10)
    b = build_datasets(_config(data, tmp_path, cache="c2"), train_samples=100, valid_samples=10)  # new cache
    c = build_datasets(_config(data, tmp_path, seed=2, cache="c1"), train_samples=100, valid_samples=10)
    tokens = {name: batch_at(d.train, 0, 100)["tokens"] for name, d in (("a", a), ("b", b), ("c", c))}
    assert torch.equal(tokens["a"], tokens["b"])
    assert not torch.equal(tokens["a"], tokens["c"])
    assert torch.equal(batch_at(a.valid, 0, 10)["tokens"], batch_at(b.valid, 0, 10)["tokens"])

    ids = [int(a.train[i]["dataset_id"]) for i in range(100)]
    assert abs(ids.count(0) - 70) <= 1 and abs(ids.count(1) - 30) <= 1  # the 0.7 / 0.3 blend
    assert a.documents == {str(data["stdlib"]): 45, str(data["words"]): 80}
    for train_part, valid_part, n in zip(a.train.datasets, a.valid.datasets, (45, 80)):
        train_docs, valid_docs = set(train_part.indices.tolist()), set(valid_part.indices.tolist())
        assert train_docs == set(range(round(0.8 * n))) and valid_docs == set(range(round(0.8 * n), n))
    assert any(a.cache_dir.glob("*-BlendedDataset-train-dataset_index.npy"))


def test_a_second_job_on_the_same_cache_waits_for_the_first(data, tmp_path):
    """megatron writes its index caches in place, so a job's rank 0 builds them under a lock on the cache:
    while another job holds it, building datasets waits; once it is released, the build completes."""
    first = build_datasets(_config(data, tmp_path), train_samples=100, valid_samples=10)
    done = threading.Event()
    with open(first.cache_dir / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: (build_datasets(_config(data, tmp_path, seed=3), train_samples=200,
                                                                 valid_samples=10), done.set()))
        second.start()
        assert not done.wait(timeout=3.0), "built the datasets while another job held the cache's lock"
    second.join(timeout=120)
    assert done.is_set()


def test_train_samples_past_one_epoch_repeat_documents(data, tmp_path):
    one_prefix = DataConfig(prefixes=str(data["words"]), tokenizer_model=str(data["tok"]),
                            cache_dir=str(tmp_path / "c"), split="1,0,0", sequence_length=64)
    epoch_tokens = inspect_prefix(data["words"]).tokens
    asked = 3 * int(epoch_tokens) // 64
    ds = build_datasets(one_prefix, train_samples=asked)
    assert ds.valid is None and len(ds.train) >= asked
    assert batch_at(ds.train, asked - 2, 2)["tokens"].shape == (2, 64)


def test_default_split_with_an_empty_test_share_builds(data, tmp_path):
    """949,50,1 of 80 documents leaves the test range empty: megatron loops forever on an empty range, so
    the unused test split must not reach it."""
    cfg = DataConfig(prefixes=str(data["words"]), tokenizer_model=str(data["tok"]),
                     cache_dir=str(tmp_path / "c"), sequence_length=16)
    ds = build_datasets(cfg, train_samples=10, valid_samples=2)
    assert len(ds.valid.indices) == 4 and len(ds.train.indices) == 76


def test_batch_at_shapes_label_shift_and_resume(data, tmp_path):
    ds = build_datasets(_config(data, tmp_path), train_samples=40, valid_samples=4).train
    batch = batch_at(ds, 8, 6)
    assert {k: tuple(v.shape) for k, v in batch.items()} == dict.fromkeys(batch, (6, 32))
    assert batch["tokens"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"][0], torch.arange(32))
    everything = batch_at(ds, 0, len(ds))["tokens"]
    assert int(everything.max()) < VOCAB and int((everything == 2).sum()) > 0  # documents end in eod

    # Resuming at a step reads the same samples; data-parallel slices tile the global batch.
    halves = [batch_at(ds, *data_parallel_slice(2, 6, r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([h["tokens"] for h in halves]), batch_at(ds, 12, 6)["tokens"])
    pieces = [batch_at(ds, 8, 2)["labels"], batch_at(ds, 10, 4)["labels"]]
    assert torch.equal(torch.cat(pieces), batch["labels"])
    with pytest.raises(HypercloneError, match=r"samples \[38, 42\) are outside"):
        batch_at(ds, 38, 4)
    with pytest.raises(HypercloneError, match="does not split over 4"):
        data_parallel_slice(0, 6, 0, 4)


def test_loader_input_errors_are_one_line(data, tmp_path):
    cases = [
        ({"prefixes": (str(tmp_path / "nope"),)}, "nope.idx is missing"),
        ({"weights": (1.0,)}, "1 blend weights for 2 dataset prefixes"),
        ({"split": "0,1,0"}, "gives the train set no documents"),
        ({"split": "a,b"}, "bad split"),
        ({"tokenizer_model": str(tmp_path / "missing.model")}, "missing.model does not exist"),
    ]
    for changes, message in cases:
        fields = {"prefixes": (str(data["stdlib"]), str(data["words"])), "tokenizer_model": str(data["tok"]),
                  "cache_dir": str(tmp_path / "c"), **changes}
        with pytest.raises(HypercloneError, match=message) as err:
            build_datasets(DataConfig(**fields), train_samples=10, valid_samples=2)
        assert "\n" not in str(err.value)
    tiny = DataConfig(prefixes=(str(data["stdlib"]),), tokenizer_model=str(data["tok"]),
                      cache_dir=str(tmp_path / "c"), split="999,1,0")
    with pytest.raises(HypercloneError, match="leaves the valid set of .* without documents"):
        build_datasets(tiny, train_samples=10, valid_samples=2)


def test_torchrun_two_ranks_share_one_cache_and_see_the_same_samples(data, tmp_path):
    cache = tmp_path / "shared_cache"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), "--workdir", str(tmp_path),
           "--tokenizer", str(data["tok"]), "--prefix", str(data["stdlib"]), "--prefix", str(data["words"]),
           "--cache", str(cache)]
    proc = subprocess.run(cmd, check=False, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["loaded_from_cache"] == [False, False]  # rank 0 built the indices ...
    assert r1["loaded_from_cache"] == [True, True]  # ... rank 1 read them back from the shared cache
    assert not r0["cuda_initialized"] and not r1["cuda_initialized"]
    assert r0["cache_dir"] == r1["cache_dir"] and Path(r0["cache_dir"]).parent == cache
    assert torch.equal(r0["train"], r1["train"]) and torch.equal(r0["valid"], r1["valid"])

    # The same config in this process (another cache) gives the same samples, and the ranks' slices tile them.
    cfg = DataConfig(prefixes=(str(data["stdlib"]), str(data["words"])), weights=(0.6, 0.4),
                     tokenizer_model=str(data["tok"]), cache_dir=str(tmp_path / "local"), split="80,20,0",
                     sequence_length=32, seed=5)
    local = build_datasets(cfg, train_samples=3 * 4 + 12, valid_samples=8)
    assert torch.equal(batch_at(local.train, 0, 12)["tokens"], r0["train"])
    assert torch.equal(batch_at(local.valid, 0, 8)["tokens"], r0["valid"])
    for step in range(3):
        tiled = torch.cat([r0["slices"][step], r1["slices"][step]])
        assert torch.equal(tiled, batch_at(local.train, step * 4, 4)["tokens"])


# --- the hyperclone data CLI ------------------------------------------------------------------------------


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """The contract of tests/test_cli_bad_inputs.py: exit 2, no stdout, one stderr line naming `names`."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == BAD_INPUT, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("hyperclone data: error: "), proc.stderr
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert proc.stdout == ""
    return lines[0]


def test_cli_bad_inputs_give_one_line_and_write_nothing(data, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "corrupt.model").write_bytes(b"\x0a\x05piece" + bytes(range(40)))
    (tmp_path / "ok.txt").write_text(SAMPLES[0])
    (tmp_path / "nokey.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    (tmp_path / "half.bin").write_bytes(b"\0\0")
    out, ok, tok = tmp_path / "out" / "p", tmp_path / "ok.txt", data["tok"]
    cases = {
        "missing input": (["data", "tokenizer", "--input", tmp_path / "missing.txt", "--out", out],
                          ["missing.txt", "does not exist"]),
        "empty text": (["data", "tokenizer", "--input", tmp_path / "empty.txt", "--out", out],
                       ["empty.txt", "no text"]),
        "empty jsonl": (["data", "tokenizer", "--input", tmp_path / "empty.jsonl", "--out", out],
                        ["empty.jsonl", "no text"]),
        "missing tokenizer": (["data", "prepare", "--input", ok, "--tokenizer", tmp_path / "none.model", "--out", out],
                              ["none.model", "does not exist"]),
        "corrupt tokenizer": (["data", "prepare", "--input", ok, "--tokenizer", tmp_path / "corrupt.model", "--out",
                               out], ["corrupt.model", "not a sentencepiece model"]),
        "jsonl without key": (["data", "prepare", "--input", tmp_path / "nokey.jsonl", "--tokenizer", tok, "--out",
                               out], ["nokey.jsonl:2", "'text'", "body"]),
        "half a dataset": (["data", "inspect", tmp_path / "half"], ["half.idx is missing"]),
        "tiny vocab": (["data", "tokenizer", "--input", ok, "--out", out, "--vocab-size", "100"], ["--vocab-size 100"]),
    }
    for args, names in cases.values():
        assert_one_line_error(hyperclone_in_process(*args), *names)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), args


def test_cli_commands_write_and_report(data, tmp_path):
    (tmp_path / "a.txt").write_text(SAMPLES[0] * 20)
    proc = hyperclone_in_process("data", "tokenizer", "--input", tmp_path / "a.txt", "--out", tmp_path / "t",
                                 "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 't.model'}: sentencepiece BPE, vocab 300")
    proc = hyperclone_in_process("data", "inspect", data["words"], "--tokenizer", data["tok"])
    assert proc.returncode == 0, proc.stderr
    tokens = int(inspect_prefix(data["words"]).tokens)
    assert proc.stdout.strip().startswith(f"{data['words']}: 80 documents, {tokens} tokens (uint16)")
    assert proc.stdout.strip().endswith("OK")
