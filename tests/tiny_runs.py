"""Shared by several test files: a small prepared data directory, tiny runs, tiny models and tokens."""

from __future__ import annotations

from pathlib import Path

import torch

import piformer
from piformer.config import ModelConfig, train_recipe
from piformer.data import prepare
from piformer.model import PiGPT
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


def tiny(preset: str = "SM+LN+G", seed: int = 0, **kw) -> PiGPT:
    """A tiny untrained model of `preset`, seeded."""
    torch.manual_seed(seed)
    return PiGPT(ModelConfig.from_preset(preset, size="tiny", **kw))


def tokens(cfg: ModelConfig, B: int = 2, seed: int = 1) -> torch.Tensor:
    """B seeded rows of random token ids, one full context each."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
