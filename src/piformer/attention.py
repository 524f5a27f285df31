"""Causal attention that also returns each query row's entropy, without keeping the (T, T) matrix.

    y, row_entropy = attention_with_entropy(q, k, v)   # (B, H, T, D), (B, H, T)

For row i with logits s_ij = scale * q_i . k_j and p_i = softmax(s_i) over the causal keys j <= i,

    H_i = -sum_j p_ij log p_ij = lse_i - sum_j p_ij s_ij = lse_i - scale * q_i . (P K)_i,

so one fused attention pass whose values are [V | K] gives P V (the output), P K and the
log-sum-exp lse: the entropy needs no probability matrix. On the CPU that pass is PyTorch's
flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`), which works in query and key
tiles and keeps O(B H T) for backward (its output and lse), recomputing P in its backward.

Backward. H_i is a function of row i's logits alone, with dH_i/ds_ij = -p_ij (s_ij - E_i[s]).
The kernel's backward forms dS = P o (dO V'^T - D), D_i = sum_c dO_ic out_ic. Feeding it
dO = [dy | -scale * dH_i * q_i] adds, per row, -dH_i s_ij to dO V'^T and -dH_i E_i[s] to D:
exactly dH's term of dS. Its dQ and dK are then the full gradients; the gradient it returns for
K-as-value belongs to no real input and is dropped (the K that the entropy depends on is the one
in the logits, already in dK). The kernel wants one head width for q, k and v, so q and k are
zero-padded to 2D (the zeros add nothing to q . k).

`fused_entropy_unsupported(q, dropout_p)` says why the fused pass cannot run (another device,
a half-precision dtype, dropout on the probabilities); callers then fall back to the explicit
path and say so once (`warn_fallback_once`).
"""

from __future__ import annotations

import math
import warnings

import torch

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_FUSED_DTYPES = (torch.float32, torch.float64)
_warned: set[str] = set()


def fused_entropy_unsupported(q: torch.Tensor, dropout_p: float = 0.0) -> str | None:
    """None when `attention_with_entropy` can run on q's device and dtype; else the reason."""
    if q.device.type != "cpu":
        return f"device {q.device.type} (the fused entropy kernel is CPU-only so far)"
    if q.dtype not in _FUSED_DTYPES:
        return f"dtype {q.dtype} (the fused entropy kernel runs float32 and float64)"
    if dropout_p > 0:
        return f"attention dropout {dropout_p:g} (the entropy of dropped-out rows is not defined by the kernel)"
    return None


def warn_fallback_once(reason: str) -> None:
    """One warning per distinct reason per process: the explicit path keeps (B, H, T, T) for backward."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"attention entropy: using the explicit (B, H, T, T) path because of {reason}; "
            "memory grows with T^2 and the step is slower",
            RuntimeWarning,
            stacklevel=3,
        )


class _FlashAttentionWithEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        D = q.shape[-1]
        qp, kp, vp = _padded(q, k, v)
        out, lse = _FLASH_CPU(qp, kp, vp, 0.0, True, scale=scale)  # out = P [V | K]
        y, pk = out[..., :D], out[..., D:]
        ent = lse - scale * (q * pk).sum(-1)
        # Only what backward cannot rebuild cheaply: O(B H T D); the padded copies are remade there.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return y, ent

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dent: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        D = q.shape[-1]
        dy = torch.zeros_like(q) if dy is None else dy
        dpk = torch.zeros_like(q) if dent is None else (-ctx.scale * dent).unsqueeze(-1) * q
        dq, dk, dvp = _FLASH_CPU_BACKWARD(
            torch.cat([dy, dpk], -1).contiguous(), *_padded(q, k, v), out, lse, 0.0, True, scale=ctx.scale
        )
        return dq[..., :D], dk[..., :D], dvp[..., :D], None


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    zeros = torch.zeros_like(q)
    return torch.cat([q, zeros], -1), torch.cat([k, zeros], -1), torch.cat([v, k], -1)


def attention_with_entropy(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention and each row's entropy (nats), fused; differentiable in q, k, v.

    q, k, v: (B, H, T, D) on the CPU, float32 or float64 (check `fused_entropy_unsupported`).
    scale defaults to 1/sqrt(D). Returns y (B, H, T, D) and the row entropies (B, H, T).
    """
    reason = fused_entropy_unsupported(q)
    if reason is not None:
        raise ValueError(f"attention_with_entropy: unsupported input: {reason}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _FlashAttentionWithEntropy.apply(q, k, v, scale)
