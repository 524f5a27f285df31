"""Measure per-head attention entropy (Eq. 7) of a model on validation batches.

    batches = val_batches("data/builtin", seq_len=128, batch_size=8, max_batches=8)
    entropy, n_seq = measure_head_entropy(model, batches)      # (L, H) nats, sequences seen

Validation windows come from a prepared data directory (`val.bin` + `meta.json`), read with
`piformer.data.TokenData` (the same fixed window order evaluation uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..data import TokenData
from ..entropy import head_entropy as _head_entropy


def val_batches(
    data_dir: str | Path,
    seq_len: int,
    batch_size: int = 8,
    max_batches: int | None = 8,
    vocab_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Token batches ``(B, seq_len)`` (int64) of a data directory's validation split.

    Non-overlapping windows in the fixed order `TokenData.val_windows` defines, so every run
    measured on the same data sees the same tokens. With `vocab_size`, ids outside the model's
    vocabulary are an error (the data was tokenized for another model).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"batches must be >= 1, got {max_batches}")
    data_dir = Path(data_dir).expanduser()
    data = TokenData(data_dir)  # the one window reader (training's validation uses it too)
    n = len(data.val)
    if n < seq_len + 1:
        raise ValueError(
            f"{data_dir}: the validation split has {n} tokens, too few for one window of "
            f"seq_len={seq_len} (+1); pass a shorter --seq-len or a larger data directory"
        )
    for x, _ in data.iter_val(batch_size, seq_len, max_batches=max_batches):
        if vocab_size is not None and x.numel() and int(x.max()) >= vocab_size:
            raise ValueError(
                f"{data_dir}: token id {int(x.max())} is outside the model's vocabulary (vocab_size={vocab_size}): "
                "this data directory was tokenized for a different model; pass the --data the model was trained on"
            )
        yield x


def entropy_from_attentions(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 7 from per-layer attention probabilities ``(B, H, T, T)``: ``(L, H)``, nats."""
    return torch.stack([_head_entropy(a) for a in attentions])


@torch.no_grad()
def measure_head_entropy(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Per-head entropy ``(L, H)`` averaged over all query rows of all sequences in `batches`.

    model: a `PiGPT` (its ``return_entropy=True`` path: the fused attention-with-entropy kernel of
    `piformer.attention` on the CPU, no (B, H, T, T) tensor), or any callable mapping a token batch
    ``(B, T)`` to an ``(L, H)`` entropy matrix averaged over that batch (e.g. the HF path).
    Returns (entropy in float64 on the CPU, number of sequences).
    """
    if isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model, "thresholds"):
        was_training = model.training
        model.eval()
        fn = lambda idx: model(idx, return_entropy=True).head_entropy  # noqa: E731
    else:
        was_training, fn = None, model
    total: torch.Tensor | None = None
    n = 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="entropy", unit="batch", leave=False, disable=None)
    try:
        for idx in it:
            idx = idx.to(device)
            e = fn(idx).detach().double().cpu() * idx.shape[0]
            total = e if total is None else total + e
            n += idx.shape[0]
    finally:
        if was_training:
            model.train()
    if total is None:
        raise ValueError("no validation batches to measure entropy on")
    return total / n, n
