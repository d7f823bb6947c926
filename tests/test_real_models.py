"""Real pretrained checkpoints end to end (tests/real_models.py builds them from registry GGUF packages):
SmolLM2-135M-Instruct, a Llama with 9 query / 3 kv heads, 30 layers, tied embeddings, vocabulary 49152, and
Gemma 3 270M (4 query / 1 kv head of 256, 18 layers in a 5:1 pattern of sliding-window and global layers
with two RoPE bases, (1 + w) sandwich norms, q/k norms, a sqrt(hidden)-scaled tied embedding, vocabulary
262144), both bf16 safetensors with their own Hugging Face tokenizer and chat template.

- each grown x2 (noisy) to HF in float32: logits within 1e-5 of the small model's, perplexity on English
  text equal to 1e-4, 32 greedy tokens identical, the tokenizer and chat template carried along;
- Gemma 3 into a megatron format: refused in one line naming the feature GPTModel lacks;
- into torch_dist at TP2 x PP4 with uneven stages (7-8-8-7 of 30 layers), verified at that layout and at TP3;
- continued pretraining with its own tokenizer on English text prepared with ``hyperclone data prepare``:
  the first loss is the small HF model's own on those tokens; the exported model chats.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from real_models import materialize
from warm import failure_text, hyperclone_in_process, run_warm

pytestmark = [pytest.mark.real, pytest.mark.slow]
TOL, PPL_TOL = 1e-5, 1e-4
UNEVEN = ["--tp", "2", "--pp", "4", "--decoder-first-pipeline-num-layers", "7", "--decoder-last-pipeline-num-layers",
          "7"]
ITERS, GBS, SEQ = 1, 1, 128  # one step of the 538M grown model: its first loss, then a checkpoint to export
TRAIN = ["--train-iters", str(ITERS), "--global-batch-size", str(GBS), "--micro-batch-size", "1", "--seq-length",
         str(SEQ), "--lr", "1e-5", "--no-progress"]


def english_text() -> str:
    """Real English prose every Python installation carries: the language reference's topics (pydoc)."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return materialize("smollm2")


@pytest.fixture(scope="module")
def gemma3() -> Path:
    return materialize("gemma3")


@pytest.fixture(scope="module")
def gemma3_runs(gemma3, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real_gemma3")
    steps = [
        {"name": "hf", "run": ["convert", str(gemma3), "--out", str(root / "hf"), "--width-factor", "2", "--method",
                               "noisy", "--dtype", "float32", "--no-progress"]},
        {"name": "verify hf", "run": ["verify", str(gemma3), str(root / "hf")]},
        {"name": "torch_dist", "run": ["convert", str(gemma3), "--out", str(root / "td"), "--format", "torch_dist",
                                       "--width-factor", "2", "--no-progress"]},
    ]
    return {"root": root, **run_warm(steps, root / "warm")}


@pytest.fixture(scope="module")
def runs(smollm2, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real_smollm2")
    corpus = root / "english.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_text().split("\n\n") if t.strip()))
    prepared = hyperclone_in_process("data", "prepare", "--input", corpus, "--tokenizer", smollm2, "--out",
                                     root / "english")
    assert prepared.returncode == 0, prepared.stderr
    grow = ["--width-factor", "2", "--method", "noisy"]
    steps = [
        {"name": "hf", "run": ["convert", str(smollm2), "--out", str(root / "hf"), *grow, "--dtype", "float32",
                               "--no-progress"]},
        {"name": "verify hf", "run": ["verify", str(smollm2), str(root / "hf")]},
        {"name": "torch_dist", "run": ["convert", str(smollm2), "--out", str(root / "td"), "--format", "torch_dist",
                                       *grow, *UNEVEN, "--dtype", "float32", "--no-progress"]},
        {"name": "verify uneven", "run": ["verify", str(smollm2), str(root / "td"), *UNEVEN], "nproc": 8},
        {"name": "verify tp3", "run": ["verify", str(smollm2), str(root / "td"), "--tp", "3"], "nproc": 3},
        {"name": "pretrain", "entry": "pretrain", "run": ["--clone-from", str(smollm2), *grow, *TRAIN, "--data-path",
                                                         str(root / "english"), "--save", str(root / "trained"),
                                                         "--metrics-file", str(root / "metrics.jsonl")]},
        {"name": "export", "run": ["export", str(root / "trained"), "--out", str(root / "exported"),
                                   "--no-progress"]},
    ]
    return {"root": root, **run_warm(steps, root / "warm")}


def ok(run: dict) -> dict:
    assert run["status"] == 0, failure_text(run)
    return run


def max_rel(run: dict) -> float:
    line = next(line for line in ok(run)["stdout"].splitlines() if line.startswith("max abs logit diff"))
    print(f"\n{run['name']}: {line}")
    return float(line.split("max rel ")[1].split()[0])


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_grown_to_hf_computes_the_same_function(request, model):
    import transformers

    source = request.getfixturevalue(model)
    runs = request.getfixturevalue("runs" if model == "smollm2" else f"{model}_runs")
    assert max_rel(runs["verify hf"]) <= TOL
    tok = transformers.AutoTokenizer.from_pretrained(runs["root"] / "hf")  # its own tokenizer, carried along
    small = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    grown = transformers.AutoModelForCausalLM.from_pretrained(runs["root"] / "hf", dtype=torch.float32).eval()
    ids = tok(english_text()[:2000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ppl = [math.exp(m(ids, labels=ids).loss.item()) for m in (small, grown)]
        question = "What is a Python generator?"
        prompt = (tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
                  if tok.chat_template else tok(question, return_tensors="pt"))  # a base model: plain text
        greedy = [m.generate(**prompt, max_new_tokens=32, do_sample=False) for m in (small, grown)]
    print(f"perplexity small {ppl[0]:.6f}, grown {ppl[1]:.6f}; greedy: {tok.decode(greedy[0][0, -32:])!r}")
    assert abs(ppl[1] - ppl[0]) / ppl[0] <= PPL_TOL
    assert torch.equal(greedy[0], greedy[1])


def test_gemma3_into_megatron_is_refused_naming_the_feature(gemma3_runs):
    run = gemma3_runs["torch_dist"]
    lines = [line for line in run["stderr"].splitlines() if line.strip()]
    assert run["status"] == 2 and len(lines) == 1 and "sqrt(hidden_size)" in lines[0], failure_text(run)
    assert not (gemma3_runs["root"] / "td").exists()


def test_torch_dist_at_an_uneven_layout_and_at_tp3(runs):
    ok(runs["torch_dist"])
    assert max_rel(runs["verify uneven"]) <= TOL
    assert max_rel(runs["verify tp3"]) <= TOL


def test_pretraining_starts_at_the_small_models_loss_and_exports(runs, smollm2):
    """Computed without the trainer: the small HF model's mean cross entropy on the trainer's first global
    batch (the same indexed dataset, cache and seed) equals the grown run's first logged loss."""
    import transformers

    from hyperclone_dist.data.loader import DataConfig, batch_at, build_datasets
    from hyperclone_dist.train.data_feed import default_cache

    ok(runs["pretrain"])
    first = json.loads((runs["root"] / "metrics.jsonl").read_text().splitlines()[0])
    config = DataConfig(prefixes=(str(runs["root"] / "english"),), tokenizer_model=str(smollm2),
                        cache_dir=str(default_cache() / "index"), split="949,50,1", sequence_length=SEQ, seed=0)
    batch = batch_at(build_datasets(config, ITERS * GBS, 0).train, 0, GBS)
    small = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = small(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    print(f"\nfirst loss {first['train/loss']!r}, small HF model {expected.item()!r}")
    assert abs(first["train/loss"] - expected.item()) / expected.item() <= TOL
    ok(runs["export"])
    tok = transformers.AutoTokenizer.from_pretrained(runs["root"] / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(runs["root"] / "exported").eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = exported.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8
