"""What a run reports, from one rank: the last pipeline stage's first tensor- and data-parallel rank,
the one that holds the loss (torchtitan and Megatron-LM log from there too).

Each logged step goes to the progress bar, TensorBoard, wandb (offline unless ``WANDB_MODE`` says
otherwise; it never waits on the network) and one JSON line in ``metrics.jsonl`` that recipes and tests
read back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hyperclone_dist.progress import progress_bar, show_progress

# dense bf16 peak per device, for the MFU estimate when --peak-tflops is not given
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def is_logging_rank() -> bool:
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def device_peak_tflops(given: float | None) -> float | None:
    import torch

    if given is not None:
        return given
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)


def flops_per_token(cfg, seq_length: int) -> float:
    """Training FLOPs per token: 6 x (matrix parameters, head included) + attention scores and values
    (PaLM appendix B, causal halving ignored as Megatron-LM does)."""
    d, L = cfg.hidden_size, cfg.num_layers
    per_layer = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d
    per_layer += (3 if cfg.gated_mlp else 2) * d * cfg.ffn_hidden_size
    matrices = L * per_layer + cfg.vocab_size * d
    return 6.0 * matrices + 12.0 * L * cfg.q_size * seq_length


_SHOWN = ("train/loss", "valid/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s")  # in the log line


class Monitor:
    def __init__(self, *, enabled: bool, total_steps: int, start_step: int, out_dir: Path | None,
                 tensorboard_dir: str | None, wandb_project: str | None, wandb_name: str | None,
                 metrics_file: str | None, run_config: dict, progress: bool):
        self.enabled = enabled
        self._total = total_steps
        self._writer = self._wandb = self._metrics = self._bar = None
        self._last_time = time.perf_counter()
        if not enabled:
            return
        tb_dir = tensorboard_dir or (out_dir / "tensorboard" if out_dir else None)
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(tb_dir))
        if wandb_project:
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=run_config,
                                     dir=str(out_dir or "."), settings=wandb.Settings(init_timeout=30))
        metrics = metrics_file or (out_dir / "metrics.jsonl" if out_dir else None)
        if metrics:
            Path(metrics).parent.mkdir(parents=True, exist_ok=True)
            self._metrics = open(metrics, "a", buffering=1)  # noqa: SIM115 - open for the run, closed by close()
        if show_progress(progress):  # not a terminal (a batch job's log): the per-step lines of log() instead
            self._bar = progress_bar(total=total_steps, initial=start_step, desc="pretrain", unit="step", leave=True)

    def restart_clock(self) -> None:
        self._last_time = time.perf_counter()

    def elapsed(self) -> float:
        now = time.perf_counter()
        seconds, self._last_time = now - self._last_time, now
        return seconds

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        values = {k: v for k, v in values.items() if v is not None}
        if self._writer:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
        if self._wandb:
            self._wandb.log(values, step=step)
        if self._metrics:
            self._metrics.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in values.items() if k in _SHOWN}
        if self._bar:
            self._bar.set_postfix(shown, refresh=False)
        elif shown:  # no bar (--no-progress, a batch job's log): one line per logged step, as Megatron-LM prints
            print(f"step {step}/{self._total} | " + " | ".join(f"{k} {v}" for k, v in shown.items()), flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar:
            self._bar.update(steps)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar:
            self._bar.close()
        if self._writer:
            self._writer.close()
        if self._wandb:
            self._wandb.finish()
        if self._metrics:
            self._metrics.close()
