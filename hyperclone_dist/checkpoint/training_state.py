"""The trainer's own record in a training checkpoint (``SAVE/global_stepN/trainer_state.json``): step,
layout, model, data position, LR schedule. Read by ``--load``, by export and by a later run's hand-off."""

from __future__ import annotations

from pathlib import Path

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.jsonfile import read_json_object
from hyperclone_dist.train.schedules import LRSchedule

DS_TAG_FILE = "latest"  # DeepSpeed's: the tag of the latest checkpoint
STATE_FILE = "trainer_state.json"


def latest_training_state(load_dir: str | Path) -> dict | None:
    """The trainer state of the latest complete training checkpoint, with its DeepSpeed ``tag``; None for a
    checkpoint that holds a model only (e.g. written by ``hyperclone convert --format torch_dist``)."""
    root = Path(load_dir)
    tag_file = root / DS_TAG_FILE
    if not tag_file.is_file():
        return None
    tag = tag_file.read_text().strip()
    state_file = root / tag / STATE_FILE
    if not state_file.is_file():
        raise HypercloneError(f"--load {root}: {tag} has no {STATE_FILE}; the checkpoint is incomplete")
    state = read_json_object(state_file, f"--load {root}: trainer state")
    state["tag"] = tag
    return state


def training_meta(ckpt: Path) -> dict:
    """What a later run's hand-off schedule needs from a training checkpoint written by pretrain.py: the
    steps taken and the LR of its last update (empty for a converted checkpoint or an unreadable state)."""
    try:
        state = latest_training_state(ckpt)
        if state is None:
            return {}
        schedule = LRSchedule(**state["schedule"])
        step = int(state["step"])
    except (HypercloneError, ValueError, KeyError, TypeError):
        return {}
    return {"train_steps": step, "final_lr": schedule.lr(max(0, step - 1)), "peak_lr": schedule.peak_lr}
