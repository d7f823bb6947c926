"""The arguments our checkpoints carry for Megatron-LM, the flags `hyperclone megatron-lm-flags` prints, and
release checkpoints, pinned without Megatron-LM (tests/test_megatron_lm_interop.py runs Megatron-LM's own
code on them when a checkout is given).

The name lists below are facts of Megatron-LM at tag core_v0.16.1: what ``load_args_from_checkpoint`` copies
from a checkpoint for a dense GPT model, and what ``tools/checkpoint``'s loaders exit without.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hyperclone_dist.cli.main import main as hyperclone
from hyperclone_dist.config import ModelConfig
from hyperclone_dist.megatron import legacy, torch_dist
from hyperclone_dist.megatron.load import LegacyCheckpoint
from hyperclone_dist.megatron.model import transformer_config

REPO = Path(__file__).resolve().parents[1]
HYPERCLONE = Path(sys.executable).with_name("hyperclone")
READ_BY_USE_CHECKPOINT_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type",
    "add_position_embedding", "use_rotary_position_embeddings", "rotary_base", "rotary_percent", "rotary_interleaved",
    "add_bias_linear", "add_qkv_bias", "squared_relu", "swiglu", "untie_embeddings_and_output_weights",
    "apply_layernorm_1p", "normalization", "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout",
    "padded_vocab_size", "ckpt_format", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "tokenizer_type", "tokenizer_model")
REQUIRED_BY_TOOLS_CHECKPOINT = (  # loader_base.ensure_required_arguments and the core loader's own
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "hidden_size", "seq_length",
    "num_attention_heads", "max_position_embeddings", "position_embedding_type", "tokenizer_type", "iteration",
    "params_dtype", "sequence_parallel", "apply_query_key_layer_scaling")
MEGATRON_LM_FLAG_VALUES = {  # flag -> the TransformerConfig field it sets in Megatron-LM
    "--num-layers": "num_layers", "--hidden-size": "hidden_size", "--ffn-hidden-size": "ffn_hidden_size",
    "--num-attention-heads": "num_attention_heads", "--kv-channels": "kv_channels",
    "--norm-epsilon": "layernorm_epsilon", "--normalization": "normalization",
    "--attention-dropout": "attention_dropout", "--hidden-dropout": "hidden_dropout",
    "--init-method-std": "init_method_std"}


def _convert(src: Path, out: Path, *flags: str) -> Path:
    assert hyperclone(["convert", str(src), "--out", str(out), "--no-progress", "--width-factor", "2",
                       "--method", "noisy", *flags]) == 0
    return out


def _args(root: Path) -> argparse.Namespace:
    it_dir = legacy.latest_dir(root)
    if (it_dir / "metadata.json").is_file():
        return torch_dist.read_args(it_dir)
    return LegacyCheckpoint(root).args


def _flags(root: Path, *extra: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "hyperclone_dist.cli.main", "megatron-lm-flags", str(root), *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout.replace("\\\n", " "))


def _flag_value(flags: list[str], flag: str) -> str | None:
    return flags[flags.index(flag) + 1] if flag in flags else None


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_checkpoint_args_carry_what_megatron_lm_reads(tiny_model_dirs, tmp_path, fmt):
    root = _convert(tiny_model_dirs["llama-gqa2"], tmp_path / "ckpt", "--format", fmt, "--tp", "2")
    args = _args(root)
    cfg = ModelConfig.from_dict(args.hyperclone_config)
    missing = [name for name in READ_BY_USE_CHECKPOINT_ARGS + REQUIRED_BY_TOOLS_CHECKPOINT if not hasattr(args, name)]
    assert not missing, f"Megatron-LM reads {missing}, absent from the checkpoint's args"
    unset = [name for name in REQUIRED_BY_TOOLS_CHECKPOINT if getattr(args, name) is None]
    assert not unset, f"tools/checkpoint exits when {unset} is None"
    assert cfg.norm_eps == 1e-6 and args.layernorm_epsilon == cfg.norm_eps  # LlamaConfig's default, not 1e-5
    assert not hasattr(args, "norm_epsilon")  # the name Megatron-LM ignores: one spelling only
    assert (args.attention_dropout, args.hidden_dropout) == (0.0, 0.0)
    assert (args.sequence_parallel, args.apply_query_key_layer_scaling) == (False, False)
    assert args.group_query_attention and args.num_query_groups == cfg.num_kv_heads
    assert args.swiglu and args.untie_embeddings_and_output_weights and not args.add_bias_linear
    assert args.ckpt_format == ("torch" if fmt == "legacy" else "torch_dist")
    assert args.padded_vocab_size % (128 * 2) == 0 and args.tensor_model_parallel_size == 2
    assert args.tokenizer_type == "NullTokenizer"  # the tiny model has no tokenizer files


@pytest.mark.parametrize("name", ["llama-gqa2", "qwen3", "mistral-gqa2", "gpt2-untied", "gpt2-tied",
                                  "llama-rope-llama3"])
def test_printed_flags_build_the_model_we_build(tiny_model_dirs, tmp_path, name):
    root = _convert(tiny_model_dirs[name], tmp_path / "ckpt", "--format", "legacy")
    cfg = LegacyCheckpoint(root).config
    ours = transformer_config(cfg)
    flags = _flags(root)
    for flag, field in MEGATRON_LM_FLAG_VALUES.items():
        expected = getattr(ours, field)
        assert type(expected)(_flag_value(flags, flag)) == expected, (flag, _flag_value(flags, flag), expected)
    assert int(_flag_value(flags, "--num-query-groups")) == ours.num_query_groups
    assert ("--swiglu" in flags) == ours.gated_linear_unit
    assert ("--disable-bias-linear" in flags) == (not ours.add_bias_linear)
    assert ("--add-qkv-bias" in flags) == ours.add_qkv_bias
    assert ("--qk-layernorm" in flags) == ours.qk_layernorm
    assert ("--untie-embeddings-and-output-weights" in flags) == (not cfg.tie_word_embeddings)
    window = _flag_value(flags, "--window-size")
    assert (tuple(int(v) for v in window.split(",")) if window else None) == ours.window_size
    assert ("--use-rope-scaling" in flags) == (name == "llama-rope-llama3")
    # megatron-core's fused bias-GELU is the tanh approximation: exact GELU with biases turns it off
    assert ("--no-bias-gelu-fusion" in flags) == (cfg.activation == "gelu" and ours.add_bias_linear)
    assert _flag_value(flags, "--pretrained-checkpoint") == str(root.resolve())
    minimal = _flags(root, "--use-checkpoint-args")
    assert minimal[0] == "--use-checkpoint-args" and "--num-layers" not in minimal
    assert _flag_value(minimal, "--norm-epsilon") == _flag_value(flags, "--norm-epsilon")


@pytest.mark.parametrize(("name", "named"), [("opt", "activation relu"),
                                             ("llama-rope-linear", "linear RoPE scaling")])
def test_flags_refused_where_megatron_lm_would_compute_another_function(tiny_model_dirs, tmp_path, name, named):
    root = _convert(tiny_model_dirs[name], tmp_path / "ckpt", "--format", "legacy")
    proc = subprocess.run([sys.executable, "-m", "hyperclone_dist.cli.main", "megatron-lm-flags", str(root)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr


def test_hf_tokenizer_is_named_where_it_was_copied(tmp_path):
    from real_models import materialize

    small = materialize("smollm2")
    root = tmp_path / "ckpt"
    assert hyperclone(["convert", str(small), "--out", str(root), "--no-progress", "--format", "legacy",
                       "--release", "--dtype", "float32"]) == 0
    args = _args(root)
    assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer", str(root.resolve()))
    assert (root / "tokenizer.json").is_file()
    assert args.layernorm_epsilon == pytest.approx(1e-5) and args.num_query_groups == 3


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_release_checkpoints_are_written_and_read(tiny_model_dirs, tmp_path, fmt, capsys):
    small = tiny_model_dirs["llama-gqa2"]
    root = _convert(small, tmp_path / "ckpt", "--format", fmt, "--release")
    assert (root / legacy.TRACKER).read_text() == "release\n"
    assert (root / "release").is_dir() and not list(root.glob("iter_*"))
    capsys.readouterr()
    assert hyperclone(["verify", str(small), str(root)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    assert hyperclone(["inspect", str(root), "--check"]) == 0
    assert hyperclone(["export", str(root), "--out", str(tmp_path / "hf"), "--no-progress"]) == 0
    capsys.readouterr()
    assert hyperclone(["verify", str(small), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    regrown = _convert(root, tmp_path / "regrown", "--format", "hf")  # a release checkpoint as a growth source
    assert (regrown / "config.json").is_file()


def test_release_is_refused_for_hf_output(tiny_model_dirs, tmp_path, capsys):
    assert hyperclone(["convert", str(tiny_model_dirs["llama-gqa2"]), "--out", str(tmp_path / "x"),
                       "--release"]) == 2
    assert "--release" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


FRESH_LOAD = """
import argparse, json, sys, torch
loaded = {}
for path in sys.argv[1:]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, weights_only=True, map_location="cpu")
    loaded[path] = sorted(state)[:3]
print(json.dumps({"loaded": loaded, "megatron_imported": any(m.startswith("megatron") for m in sys.modules)}))
"""


def test_every_pickle_we_write_loads_weights_only_in_a_fresh_interpreter(tiny_model_dirs, tmp_path):
    small = tiny_model_dirs["llama-gqa2"]
    legacy_root = _convert(small, tmp_path / "legacy", "--format", "legacy", "--pp", "2")
    dist_root = _convert(small, tmp_path / "dist", "--format", "torch_dist", "--tp", "2")
    files = sorted(str(f) for root in (legacy_root, dist_root) for f in root.rglob("*.pt"))
    assert len(files) == 3, files  # two legacy rank files, torch_dist's common.pt
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD, *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["megatron_imported"] and set(result["loaded"]) == set(files)


def test_launch_script_runs_pretrain_gpt_with_the_checkpoints_flags_then_the_users(tiny_model_dirs, tmp_path):
    """launch/megatron_lm/pretrain_gpt.sh with a stand-in for the Python that runs Megatron-LM: the command
    is torch.distributed.run over pretrain_gpt.py, the checkpoint's flags first, the user's last."""
    root = _convert(tiny_model_dirs["llama-gqa2"], tmp_path / "ckpt", "--format", "torch_dist", "--release")
    megatron_lm = tmp_path / "Megatron-LM"
    megatron_lm.mkdir()
    (megatron_lm / "pretrain_gpt.py").write_text("")
    recorded = tmp_path / "argv.txt"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {recorded}\n")
    python.chmod(0o755)
    env = {**os.environ, "MEGATRON_LM": str(megatron_lm), "PYTHON": str(python), "GPUS_PER_NODE": "2",
           "NNODES": "3", "NODE_RANK": "1", "MASTER_ADDR": "node0", "HYPERCLONE": str(HYPERCLONE)}
    script = REPO / "launch" / "megatron_lm" / "pretrain_gpt.sh"
    proc = subprocess.run(["bash", str(script), str(root), "--data-path", "data/text", "--lr", "3e-4"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    argv = recorded.read_text().splitlines()
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert argv[argv.index("--nnodes") + 1] == "3" and argv[argv.index("--node_rank") + 1] == "1"
    assert argv[argv.index("--nproc_per_node") + 1] == "2" and argv[argv.index("--master_addr") + 1] == "node0"
    script_at = argv.index(str(megatron_lm / "pretrain_gpt.py"))
    flags = _flags(root)
    assert argv[script_at + 1:script_at + 1 + len(flags)] == flags
    assert argv[-4:] == ["--data-path", "data/text", "--lr", "3e-4"]  # last: they win over the defaults
    assert argv[argv.index("--save") + 1] == f"{root}-megatron-lm" == argv[argv.index("--load") + 1]
    printed = subprocess.run(["bash", str(script), str(root), "--print-flags"], capture_output=True, text=True,
                             timeout=120, env={**env, "MEGATRON_LM": ""})
    assert printed.returncode == 0 and shlex.split(printed.stdout.replace("\\\n", " ")) == flags
