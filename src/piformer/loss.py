"""Next-token cross-entropy straight from the final hidden states, without the (N, V) logits.

    loss = linear_cross_entropy(hidden, lm_head.weight, targets)   # hidden (N, C), targets (N,)
    # == F.cross_entropy(hidden @ lm_head.weight.T, targets, ignore_index=-1)

A training step reads only the loss, yet the textbook path keeps the logits' log-softmax for
backward and builds their gradient: (N, V) float tensors written and read several times, at V =
8,192 and N = 2,048 tokens 64 MB each. Here the rows go through in chunks of `CHUNK_ROWS`: for each
chunk the logits, their log-softmax and (in place) their gradient softmax - onehot live only while
the chunk is processed, and the chunk's share of both input gradients is formed at once,

    dL/dhidden_c = (softmax_c - onehot_c) W / n,     dL/dW += (softmax_c - onehot_c)^T hidden_c / n,

(n the rows not ignored), so backward only scales the two saved gradients by the upstream one.
Memory kept for backward is O(N C + V C) instead of O(N V). Measured on 2 CPU threads
(`python benchmarks/bench_entropy_attention.py loss`, docs/training.md): 512 rows per chunk was
the fastest of 128-2,048 at both cpu-small's and gpt2-small's widths.

`chunked_loss_unsupported` says when the chunked path does not apply (autocast, half precision,
under torch.compile, which fuses the textbook path itself); `PiGPT` then computes the logits and
`F.cross_entropy` as before. `PIFORMER_LOSS=full` forces that path (benchmarks compare the two).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_ROWS = 512
LOSS_ENV = "PIFORMER_LOSS"
LOSSES = ("chunked", "full")
_DTYPES = (torch.float32, torch.float64)


def requested_loss() -> str:
    """The loss path asked for by PIFORMER_LOSS ('chunked' when unset)."""
    choice = os.environ.get(LOSS_ENV) or "chunked"
    if choice not in LOSSES:
        raise ValueError(f"unknown loss path {choice!r} in {LOSS_ENV}; valid: {', '.join(LOSSES)}")
    return choice


def chunked_loss_unsupported(hidden: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when `linear_cross_entropy` can run on these tensors; else the reason."""
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        return f"dtypes {hidden.dtype}/{weight.dtype} (the chunked loss runs float32 and float64)"
    if torch.is_autocast_enabled(hidden.device.type):
        return "autocast"
    if torch.compiler.is_compiling():
        return "torch.compile"
    return None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) against `targets`, rows whose target is
    `ignore_index` left out: F.cross_entropy(hidden @ weight.T, targets, ignore_index=...) without
    materialising the (N, V) logits. hidden (N, C), weight (V, C), targets (N,) int64."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, C) and weight (V, C) expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    kept = targets != ignore_index
    bad = kept & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"target {int(targets[bad][0])} is outside the vocabulary: valid targets are "
                         f"0..{weight.shape[0] - 1}, or {ignore_index} to skip a position")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, torch.where(kept, targets, 0), kept, chunk_rows)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kept: torch.Tensor,
                chunk_rows: int):
        N = hidden.shape[0]
        n = int(kept.sum())
        all_kept = n == N
        scale = 1.0 / n if n else float("nan")  # no position left: NaN, as F.cross_entropy's mean
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if N == 0 else torch.empty_like(weight)
        total = hidden.new_zeros(())
        for start in range(0, N, chunk_rows):
            h = hidden[start:start + chunk_rows]  # (c, C)
            t = targets[start:start + chunk_rows]  # (c,)
            rows = torch.arange(h.shape[0], device=h.device)
            z = torch.log_softmax(h @ weight.t(), dim=-1)  # (c, V) log p
            picked = z[rows, t]  # (c,)
            keep = None if all_kept else kept[start:start + chunk_rows]
            total -= picked.sum() if keep is None else picked[keep].sum()
            z.exp_()
            z[rows, t] -= 1.0  # softmax - onehot: d(-log p_t)/dlogits
            if keep is not None:
                z.mul_(keep.unsqueeze(1).to(z.dtype))  # ignored positions contribute no gradient
            torch.mm(z, weight, out=grad_hidden[start:start + chunk_rows])
            if start == 0:
                torch.addmm(grad_weight, z.t(), h, beta=0, alpha=scale, out=grad_weight)
            else:
                grad_weight.addmm_(z.t(), h, alpha=scale)
        grad_hidden.mul_(scale)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Out of place: a second backward through a retained graph must find them unchanged.
        return (grad_hidden * grad_loss if ctx.needs_input_grad[0] else None,
                grad_weight * grad_loss if ctx.needs_input_grad[1] else None,
                None, None, None)


def full_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """The textbook path: F.cross_entropy over (..., V) logits, half precision raised to float32."""
    logits = logits if logits.dtype in _DTYPES else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
