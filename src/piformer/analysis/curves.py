"""Training and validation loss of a run over training, read from its metrics.jsonl.

The figures draw these; this module only reads them.

    curve = read_loss_curve("runs/sm-ln-g")
    curve.tokens(curve.steps)      # training tokens seen at each logged step
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .result import EntropyResult
from .runs import METRICS, RUN_CONFIG, STATUS, read_metrics


@dataclass
class LossCurve:
    """One run's losses against the training step."""

    name: str
    steps: np.ndarray
    """Steps with a training-loss record (the loss of that step's batch)."""
    loss: np.ndarray
    """Training loss (cross-entropy plus any regulariser) at `steps`; nan where it was not finite."""
    val_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    val_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Validation cross-entropy at `val_steps`."""
    tokens_per_step: int | None = None
    """batch_size x block_size from the run's config.json (None when unknown: the x axis stays steps)."""
    diverged_at: int | None = None

    def tokens(self, steps: np.ndarray) -> np.ndarray:
        return np.asarray(steps) * (self.tokens_per_step or 1)


def read_loss_curve(run_dir: str | Path, name: str | None = None) -> LossCurve | None:
    """The loss curve of the run in `run_dir`; None when it has no metrics.jsonl or no loss in it.

    A resumed run may log a step twice: the last record of each step wins.
    """
    run = Path(run_dir)
    if not (run / METRICS).is_file():
        return None
    records, _ = read_metrics(run / METRICS)
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    diverged = None
    for r in records:
        step = r.get("step")
        if not isinstance(step, int):
            continue
        event = r.get("event")
        if event == "eval" and isinstance(r.get("val_loss"), (int, float)):
            val[step] = float(r["val_loss"])
        elif event == "diverged":
            diverged = step
        elif event is None and "loss" in r:
            train[step] = float(r["loss"]) if isinstance(r["loss"], (int, float)) else float("nan")
    if not train and not val:
        return None
    tokens_per_step = None
    if (run / RUN_CONFIG).is_file():
        try:
            cfg = json.loads((run / RUN_CONFIG).read_text())
            tokens_per_step = int(cfg["train"]["batch_size"]) * int(cfg["model"]["block_size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
    if diverged is None and (run / STATUS).is_file():
        try:
            diverged = json.loads((run / STATUS).read_text()).get("diverged_at")
        except json.JSONDecodeError:
            pass
    ts, vs = sorted(train), sorted(val)
    return LossCurve(
        name=name or run.name,
        steps=np.array(ts, dtype=int), loss=np.array([train[s] for s in ts], dtype=float),
        val_steps=np.array(vs, dtype=int), val_loss=np.array([val[s] for s in vs], dtype=float),
        tokens_per_step=tokens_per_step, diverged_at=diverged,
    )


def read_loss_curves(runs: Sequence[str | Path], results: Sequence[EntropyResult]) -> list[LossCurve | None]:
    """The loss curves of the run directories `runs`, labelled as their entropy `results` are (one
    result per run, in order, as `load_or_analyse` gives them; directory names otherwise)."""
    runs = [Path(r) for r in runs]
    names = [r.name for r in results] if len(results) == len(runs) else [None] * len(runs)
    return [read_loss_curve(p, n) for p, n in zip(runs, names) if p.is_dir()]
