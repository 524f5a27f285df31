"""The run directory: its layout and file names, and reading, writing and locking it. One owner.

    RUN_DIR/
        config.json          preset, size, model and train configs, data dir and its fingerprint
        status.json          {status: running|finished|diverged|interrupted|terminated|failed, step, ...}
        metrics.jsonl        one JSON object per logged step or event (piformer.logging_sinks)
        tensorboard/         TensorBoard events, when asked for
        checkpoints/best/    model.safetensors, config.json, trainer_state.pt (piformer.checkpoint)
        checkpoints/last/    the same, for the latest step
        .lock, .lock.holder  held by the train() writing the run; who holds it
        eval.json            stage outputs of `piformer reproduce`: validation score,
        entropy.json         entropy analysis,
        pi_cost.json         analytic private-inference cost at the run's shape,
        pi_cost_gpt2.json    the same at the paper's GPT-2 shape,
        pi_secure.json       and the secure-inference measurement

The trainer writes the first group; `reproduce` writes the stage outputs and `report` reads them.
Everything else asks this module where a file is and what the run recorded.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import RunInUseError
from .fileio import atomic_write_text, file_mode

CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
METRICS_PREVIOUS = "metrics.previous-attempt.jsonl"
"""metrics.jsonl of an attempt that stopped before its first checkpoint, kept aside when it is started over."""
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST, LAST = "best", "last"
LOCK_FILE = ".lock"
LOCK_HOLDER = ".lock.holder"
"""RUN_DIR/.lock is held while a train() writes the run; .lock.holder says who holds it."""

# Stage outputs of `piformer reproduce`, read back by the report.
EVAL = "eval.json"
ENTROPY = "entropy.json"
PI_COST = "pi_cost.json"
PI_COST_GPT2 = "pi_cost_gpt2.json"
PI_SECURE = "pi_secure.json"
PI_ESTIMATE = "pi_estimate.json"


def checkpoint_dir(run: str | Path, which: str) -> Path:
    """RUN_DIR/checkpoints/{which} (best or last); it may not exist yet."""
    return Path(run) / CHECKPOINTS / which


def has_checkpoint(run: str | Path) -> bool:
    """Whether the run has a loadable checkpoint (best or last) to resume from or analyse."""
    from .checkpoint import resolve_checkpoint

    try:
        resolve_checkpoint(run, LAST)
        return True
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------
# config.json


def has_config(run: str | Path) -> bool:
    """Whether `run` holds a run: its config.json is written when training starts."""
    return (Path(run) / CONFIG).is_file()


def read_config(run: str | Path) -> dict[str, Any]:
    """RUN_DIR/config.json as a dict (FileNotFoundError when absent)."""
    return json.loads((Path(run) / CONFIG).read_text())


def write_config(run: str | Path, config: dict[str, Any]) -> None:
    atomic_write_text(Path(run) / CONFIG, json.dumps(config, indent=1) + "\n")


def recorded_data_dir(config: dict[str, Any], run: str | Path | None = None) -> Path | None:
    """The data directory a run's config records (None if it records none). A relative path is
    looked for under the working directory, then the run directory and its parent."""
    raw = _data_dir_entry(config)
    if raw is None:
        return None
    p = Path(raw).expanduser()
    if p.is_absolute() or run is None:
        return p
    for base in (Path.cwd(), Path(run), Path(run).parent):
        if (base / p).is_dir():
            return base / p
    return p


def _data_dir_entry(cfg: dict[str, Any]) -> str | None:
    # piformer writes data.dir; the other keys are older or foreign layouts still read.
    for key in ("data_dir", "data"):
        v = cfg.get(key)
        if isinstance(v, str) and v:
            return v
        if isinstance(v, dict):
            for k in ("dir", "data_dir", "path", "out_dir"):
                if isinstance(v.get(k), str) and v[k]:
                    return v[k]
    train = cfg.get("train")
    if isinstance(train, dict) and isinstance(train.get("data_dir"), str):
        return train["data_dir"]
    return None


def run_data_dir(run: str | Path) -> Path | None:
    """The data directory recorded in RUN_DIR/config.json; None when there is no readable record."""
    try:
        cfg = read_config(run)
    except (OSError, ValueError):
        return None
    return recorded_data_dir(cfg, run) if isinstance(cfg, dict) else None


def read_model_config(path: str | Path):
    """ModelConfig from a run directory, a checkpoint directory or a config.json file: the run's
    config.json first, then checkpoints/best's, then checkpoints/last's. Accepts a flat ModelConfig
    dict or one nested under a "model" key."""
    from .config import ModelConfig

    p = Path(path)
    candidates = [p] if p.is_file() else [
        p / CONFIG, checkpoint_dir(p, BEST) / CONFIG, checkpoint_dir(p, LAST) / CONFIG,
    ]
    for c in candidates:
        if c.is_file():
            data = json.loads(c.read_text())
            if isinstance(data.get("model"), dict):
                data = data["model"]
            return ModelConfig.from_saved(data)
    if not p.exists():
        raise FileNotFoundError(f"no such run directory or file: {p}")
    raise FileNotFoundError(f"no config.json in {p} (looked at: {', '.join(map(str, candidates))})")


def resume_configs(run: str | Path, overrides: dict[str, dict[str, Any]], preset: str | None = None,
                   size: str | None = None, data: str | None = None):
    """(model_cfg, train_cfg, data_dir, preset, size) to resume `run` with: its saved configs, with
    `overrides` ({"model": {...}, "train": {...}}) on top. A new preset or size rebuilds the model
    config from the preset (on the data's vocabulary) instead; `data` replaces the recorded data."""
    from .config import ModelConfig, TrainConfig
    from .data import read_meta

    run = Path(run)
    if not has_config(run):
        raise FileNotFoundError(f"--resume: {run} holds no run (no config.json); start it without --resume")
    saved = read_config(run)
    data_dir = data or recorded_data_dir(saved, run)
    if data_dir is None:
        raise ValueError(f"--resume: {run / CONFIG} records no data directory; pass --data")
    if preset or size:
        model = ModelConfig.from_preset(preset or saved.get("preset") or "SM+LN+G",
                                        size or saved.get("size") or "cpu-small",
                                        vocab_size=int(read_meta(data_dir)["vocab_size"]), **overrides["model"])
    else:
        model = ModelConfig.from_saved({**saved["model"], **overrides["model"]})
    train = TrainConfig.from_dict({**saved["train"], **overrides["train"]})
    return model, train, str(data_dir), preset or saved.get("preset"), size or saved.get("size")


# ---------------------------------------------------------------------------------------
# status.json


def read_status(run: str | Path) -> dict[str, Any]:
    """RUN_DIR/status.json; {} when absent or unreadable (a run killed before writing it)."""
    try:
        return json.loads((Path(run) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def write_status(run: str | Path, status: dict[str, Any]) -> None:
    atomic_write_text(Path(run) / STATUS, json.dumps(status, indent=1) + "\n")


# ---------------------------------------------------------------------------------------
# The lock


def lock(run: str | Path) -> FileLock:
    """Hold RUN_DIR/.lock for this process, or fail at once naming the process that holds it.

    An OS lock (flock): the kernel drops it when its holder exits, however it dies (SIGKILL, a
    lost node), so a stale lock never blocks a resume.
    """
    out = Path(run)
    out.mkdir(parents=True, exist_ok=True)
    held = FileLock(str(out / LOCK_FILE), timeout=0, mode=file_mode())
    try:
        held.acquire()
    except Timeout:
        try:
            h = json.loads((out / LOCK_HOLDER).read_text())
            holder = f"pid {h['pid']} on host {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            holder = "which one is not recorded yet"
        raise RunInUseError(f"{out} is being trained by another process ({holder}); wait for it to end or stop it, "
                            "or choose another --out") from None
    try:
        atomic_write_text(out / LOCK_HOLDER, json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    except BaseException:
        held.release()
        raise
    return held


def unlock(run: str | Path, held: FileLock) -> None:
    (Path(run) / LOCK_HOLDER).unlink(missing_ok=True)  # first: once released, the record is the next holder's
    held.release()
