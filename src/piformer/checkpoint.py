"""Checkpoints as self-describing directories: `model.safetensors` + `config.json` (+ `trainer_state.pt`).

Writes are atomic: a checkpoint is assembled in a temporary sibling directory and swapped in
with renames, so a kill at any moment leaves the previous checkpoint loadable (the loader also
recovers the `<name>.old` directory left if the kill fell between the two renames).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import fileio
from .config import ModelConfig
from .model import PiGPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
_TIED = "lm_head.weight"  # same tensor as transformer.wte.weight; stored once


def save_checkpoint(
    ckpt_dir: str | Path,
    model: PiGPT,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Save `model` (and optionally the trainer's state) to `ckpt_dir`, atomically."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    # Temporaries left by a killed save are not removed here: another process may be writing
    # one right now. train() clears them on start, holding the run directory's lock.
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir.parent, prefix=f".{ckpt_dir.name}.tmp-"))
    try:
        os.chmod(tmp, fileio.dir_mode())  # mkdtemp's 0700 would survive the rename
        model = getattr(model, "module", model)  # unwrap DDP
        model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != _TIED}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "library": "piformer"})
        (tmp / CONFIG).write_text(model.config.to_json() + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        mode = fileio.file_mode()
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fchmod(fh.fileno(), mode)  # safetensors writes its file 0600, whatever the umask
                os.fsync(fh.fileno())
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        if ckpt_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt_dir


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint directory from a checkpoint dir or a run dir (`checkpoints/{which}`, else `last`)."""
    path = Path(path)
    candidates = [path]
    if (path / "checkpoints").is_dir():
        order = [which, "last", "best"]
        candidates = [path / "checkpoints" / w for w in dict.fromkeys(order)]
    for c in candidates:
        for d in (c, c.with_name(c.name + ".old")):
            if (d / WEIGHTS).is_file() and (d / CONFIG).is_file():
                return d
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or run directory at {path}")
    raise FileNotFoundError(
        f"{path} holds no checkpoint: expected {WEIGHTS} and {CONFIG} in it, "
        f"or a run directory with checkpoints/best or checkpoints/last"
    )


def load_config(path: str | Path) -> ModelConfig:
    ckpt = resolve_checkpoint(path)
    try:
        return ModelConfig.from_saved(json.loads((ckpt / CONFIG).read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt checkpoint {ckpt}: {CONFIG} is not valid JSON ({err})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", which: str = "best") -> PiGPT:
    """Build the model a checkpoint (or run directory) describes and load its weights. One call."""
    ckpt = resolve_checkpoint(path, which)
    config = load_config(ckpt)
    model = PiGPT(config)
    try:
        tensors = load_file(str(ckpt / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupt checkpoint {ckpt}: cannot read {WEIGHTS} ({err})") from None
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # shapes that disagree with config.json
        sizes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise ValueError(f"checkpoint {ckpt} does not match its config.json: "
                         f"{sizes[0] if sizes else err}" + (f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else "")) from None
    missing = [k for k in missing if k != _TIED]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not match its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval()


def load_trainer_state(path: str | Path, which: str = "last", mmap: bool = False) -> dict[str, Any] | None:
    """The trainer state saved with a checkpoint, or None. mmap=True maps its tensors (the
    optimizer's moments, as large as the model twice over) instead of reading them: for callers
    that want only the bookkeeping (step, best_val_loss)."""
    ckpt = resolve_checkpoint(path, which)
    f = ckpt / TRAINER_STATE
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # a truncated pickle raises a zoo of types
        raise ValueError(f"corrupt checkpoint {ckpt}: cannot read {TRAINER_STATE} ({err})") from None
