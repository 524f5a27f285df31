"""Shared by the HF-export, generate and eval tests: a small prepared data directory and tiny runs."""

from __future__ import annotations

from pathlib import Path

import piformer
from piformer.config import ModelConfig, train_recipe
from piformer.data import prepare
from piformer.train import train

VOCAB = 300


def prepared_data(root: Path) -> Path:
    """piformer's own data/*.py (about 25k tokens) tokenized with a 300-entry BPE, 40% held out."""
    src = Path(piformer.__file__).parent / "data" / "*.py"
    out = root / "data"
    prepare(str(src), out, vocab_size=VOCAB, val_fraction=0.4, progress=False)
    return out


def tiny_run(root: Path, data: Path, preset: str = "SM+LN+G", steps: int = 4, **model) -> Path:
    out = root / preset
    train(ModelConfig.from_preset(preset, "tiny", **model),
          train_recipe("tiny", max_steps=steps, eval_interval=steps, checkpoint_interval=steps, log_interval=steps,
                       warmup=1, batch_size=4, micro_batch_size=4, lr=1e-2),
          data, out, progress=False)
    return out
