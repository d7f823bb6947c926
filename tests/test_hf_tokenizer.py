"""A model's own Hugging Face tokenizer, everywhere: ``hyperclone data prepare --tokenizer DIR``, the
trainer's ``--tokenizer-model DIR`` or none at all (a --clone-from model that carries one), the vocabulary
checks, and the tokenizer's companions travelling with every checkpoint written. A tiny BPE tokenizer
trained here stands in for a real one (tests/test_real_models.py runs real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from warm import failure_text, hyperclone_in_process, run_warm

from hyperclone_dist.data.loader import inspect_prefix
from hyperclone_dist.data.tokenizer import HUGGINGFACE, batch_encoder, load_tokenizer, tokenizer_info

TEXTS = ["The quick brown fox jumps over the lazy dog.\n", "def f(x):\n    return x + 1\n",
         "Growing a model keeps the function it computes.\n"] * 40
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


def make_tokenizer(directory: Path, vocab: int = 300, extra_words: int = 0):
    """A byte-level BPE tokenizer saved as Hugging Face saves one (tokenizer.json, tokenizer_config.json),
    with ``extra_words`` added tokens to make it as large as wanted."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if extra_words:
        tok.add_tokens([f"word{k}" for k in range(extra_words)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def make_model(directory: Path, vocab: int) -> Path:
    """A tiny Llama beside the tokenizer, its embedding ``vocab`` rows (padded past the tokenizer's)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    transformers.GenerationConfig(max_new_tokens=7).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_tokenizer") / "tiny-llama"
    tok = make_tokenizer(root)
    return make_model(root, vocab=len(tok) + 13)  # 13 embedding rows past the tokenizer, as real models pad


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def test_info_and_ids_match_megatrons_tokenizer(model_dir):
    for given in (model_dir, model_dir / "tokenizer.json"):
        info = tokenizer_info(given)
        assert info.library == HUGGINGFACE and info.model == model_dir and info.eod == 2 and info.bos == 1
    megatron = load_tokenizer(model_dir)
    encode = batch_encoder(model_dir)
    assert megatron.eod == 2 and megatron.vocab_size == tokenizer_info(model_dir).vocab_size
    assert encode(TEXTS[:3]) == [megatron.tokenize(t) for t in TEXTS[:3]]  # no BOS/EOS added by either


def test_prepare_ends_documents_with_the_models_eos(model_dir, corpus, tmp_path):
    proc = hyperclone_in_process("data", "prepare", "--input", corpus, "--tokenizer", model_dir, "--out",
                                 tmp_path / "docs")
    assert proc.returncode == 0, proc.stderr
    stats = inspect_prefix(tmp_path / "docs")
    assert stats.documents == len(TEXTS) and stats.dtype == "uint16"
    ids = np.fromfile(tmp_path / "docs.bin", dtype=np.uint16)
    first = batch_encoder(model_dir)([TEXTS[0]])[0]
    assert ids[: len(first) + 1].tolist() == [*first, 2]  # the document, then the EOS as end of document


def test_a_vocabulary_past_65500_is_stored_as_int32(tmp_path, corpus):
    big = tmp_path / "big"
    make_tokenizer(big, extra_words=66_000)
    proc = hyperclone_in_process("data", "prepare", "--input", corpus, "--tokenizer", big, "--out", tmp_path / "d")
    assert proc.returncode == 0, proc.stderr
    assert inspect_prefix(tmp_path / "d").dtype == "int32"  # megatron's indexed format has no uint32


def test_no_tokenizer_there_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = hyperclone_in_process("data", "prepare", "--tokenizer", tmp_path / "empty", "--out", tmp_path / "d")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "holds no Hugging Face tokenizer" in lines[0], proc.stderr


@pytest.fixture(scope="module")
def runs(model_dir, corpus, tmp_path_factory) -> dict:
    """Training and conversion with the model's own tokenizer, in one warm worker."""
    root = tmp_path_factory.mktemp("hf_tokenizer_runs")
    prepared = hyperclone_in_process("data", "prepare", "--input", corpus, "--tokenizer", model_dir, "--out",
                                     root / "docs")
    assert prepared.returncode == 0, prepared.stderr
    big = root / "big"
    make_tokenizer(big, extra_words=200)  # more tokens than the model's embedding rows
    train = ["--train-iters", "2", "--global-batch-size", "2", "--micro-batch-size", "1", "--seq-length", "16",
             "--no-progress"]
    grow = ["--clone-from", str(model_dir), "--width-factor", "2"]
    steps = [
        {"name": "own data", "entry": "pretrain", "run": [*grow, *train, "--data-path", str(root / "docs"),
                                                         "--save", str(root / "ckpt"),
                                                         "--metrics-file", str(root / "own.jsonl")]},
        {"name": "default corpus", "entry": "pretrain", "run": [*grow, *train, "--data-cache-path",
                                                               str(root / "cache"), "--metrics-file",
                                                               str(root / "default.jsonl")]},
        {"name": "too large", "entry": "pretrain", "run": [*grow, *train, "--data-path", str(root / "docs"),
                                                          "--tokenizer-model", str(big)]},
        {"name": "export", "run": ["export", str(root / "ckpt"), "--out", str(root / "exported"), "--no-progress"]},
        {"name": "convert torch_dist", "run": ["convert", str(model_dir), "--out", str(root / "td"), "--format",
                                               "torch_dist", "--width-factor", "2", "--no-progress"]},
        {"name": "convert hf", "run": ["convert", str(model_dir), "--out", str(root / "hf"), "--width-factor", "2",
                                       "--no-progress"]},
    ]
    return {"root": root, "big": big, **run_warm(steps, root / "warm")}


def test_training_reads_the_clone_sources_tokenizer(runs, model_dir):
    """No --tokenizer-model: the source's own is the one the data is read with; without --data-path the
    embedded corpus is tokenized with it too, never with a tokenizer trained anew."""
    for name in ("own data", "default corpus"):
        assert runs[name]["status"] == 0, failure_text(runs[name])
    fingerprint = tokenizer_info(model_dir).fingerprint[:16]
    assert (runs["root"] / "cache" / f"default-corpus-{fingerprint}" / "stdlib.idx").is_file()
    assert not list((runs["root"] / "cache").glob("default-corpus-v*"))


def test_a_tokenizer_larger_than_the_embedding_is_refused(runs, model_dir):
    run = runs["too large"]
    lines = [line for line in run["stderr"].splitlines() if line.strip()]
    rows = tokenizer_info(model_dir).vocab_size + 13
    assert run["status"] == 2 and len(lines) == 1, failure_text(run)
    assert f"{tokenizer_info(runs['big']).vocab_size} pieces" in lines[0] and f"is {rows}" in lines[0], lines[0]


@pytest.mark.parametrize("output", ["ckpt", "exported", "td", "hf"])
def test_companions_travel_with_every_checkpoint(runs, model_dir, output):
    """The tokenizer, its chat template and the generation config are in every checkpoint written from a
    model that has them, so that the exported model loads with AutoTokenizer and chats."""
    import transformers

    for name in ("own data", "export", "convert torch_dist", "convert hf"):
        assert runs[name]["status"] == 0, failure_text(runs[name])
    where = runs["root"] / output
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (where / name).read_bytes() == (model_dir / name).read_bytes(), (output, name)
    if output in ("exported", "hf"):
        tok = transformers.AutoTokenizer.from_pretrained(where)
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"
