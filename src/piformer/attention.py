"""Causal attention that also returns each query row's entropy, without keeping the (T, T) matrix.

    y, row_entropy = attention_with_entropy(q, k, v)   # (B, H, T, D), (B, H, T)

For row i with logits s_ij = scale * q_i . k_j and p_i = softmax(s_i) over the causal keys j <= i,

    H_i = -sum_j p_ij log p_ij = lse_i - sum_j p_ij s_ij = lse_i - scale * q_i . (P K)_i,

so one fused attention pass whose values are [K | V] gives P K, the output P V and the
log-sum-exp lse: the entropy needs no probability matrix. On the CPU that pass is PyTorch's
flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`), which works in query and key
tiles, keeps O(B H T D) for backward (its output and lse) and recomputes P in its backward.

The kernel wants one head width for queries, keys and values, so the pass runs at width 2D with
queries [q | 0] and one tensor kv = [k | v] as both keys and values: [q | 0] . [k_j | v_j] = q . k_j.
A caller that projects k and v with one matmul laid out per head as [k_h | v_h] (PiGPT does)
hands the kernel that projection's output as is (`attention_with_entropy_kv`).

Backward. H_i is a function of row i's logits alone, dH_i/ds_ij = -p_ij (s_ij - E_i[s]). The
kernel's backward forms dS = P o (dO V'^T - D) with D_i = sum_c dO_ic out_ic. Feeding it
dO = [-scale * dH_i * q_i | dy] adds -dH_i s_ij to dO V'^T and -dH_i E_i[s] to D: exactly dH's
term of dS, so its dQ and dK (the keys' half) are the full gradients. Of its dV, the values' half
is v's gradient; the keys' half (K as a value) belongs to no real input and is dropped: the
entropy depends on K only through the logits, already in dK.

`fused_entropy_unsupported(q, dropout_p)` says why the fused pass cannot run (another device,
a half-precision dtype, dropout on the probabilities); callers then fall back to the explicit
path and say so once (`warn_fallback_once`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

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
    def forward(ctx, q: torch.Tensor, kv: torch.Tensor, scale: float):
        D = q.shape[-1]
        qp = F.pad(q, (0, D))  # [q | 0]
        out, lse = _FLASH_CPU(qp, kv, kv, 0.0, True, scale=scale)  # out = P [K | V]
        pk, y = out[..., :D], out[..., D:]
        # A difference of two terms as large as the logits: when attention has collapsed (logits of
        # 1e4, rows one-hot) float32 rounding leaves it slightly below 0. An entropy is >= 0; the
        # backward below is the exact gradient whatever the clamp did to the value.
        ent = (lse - scale * (q * pk).sum(-1)).clamp_min_(0.0)
        # O(B H T D), no (T, T) tensor; q rather than [q | 0]: backward re-pads it, which is
        # cheaper than keeping a zero half alive in every layer until then.
        ctx.save_for_backward(q, kv, out, lse)
        ctx.scale = scale
        return y, ent

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dent: torch.Tensor | None):
        q, kv, out, lse = ctx.saved_tensors
        D = q.shape[-1]
        qp = F.pad(q, (0, D))
        dy = torch.zeros_like(q) if dy is None else dy
        dpk = torch.zeros_like(q) if dent is None else (-ctx.scale * dent).unsqueeze(-1) * q
        dqp, dk, dv = _FLASH_CPU_BACKWARD(torch.cat([dpk, dy], -1), qp, kv, kv, out, lse, 0.0, True, scale=ctx.scale)
        # Keys' half of dk is the keys' gradient; its values' half is exactly 0 (the queries' zero
        # half meets it), so the values' gradient goes there in place of a fresh tensor.
        dk[..., D:] = dv[..., D:]
        return dqp[..., :D], dk, None


def attention_with_entropy_kv(
    q: torch.Tensor, kv: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_entropy` with keys and values in one (B, H, T, 2D) tensor, [k | v] per head."""
    reason = fused_entropy_unsupported(q)
    if reason is not None:
        raise ValueError(f"attention_with_entropy: unsupported input: {reason}")
    if kv.shape[:-1] != q.shape[:-1] or kv.shape[-1] != 2 * q.shape[-1]:
        raise ValueError(f"attention_with_entropy: kv must be (B, H, T, 2D) for q {tuple(q.shape)}, got {tuple(kv.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _FlashAttentionWithEntropy.apply(q, kv, scale)


def attention_with_entropy(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention and each row's entropy (nats), fused; differentiable in q, k, v.

    q, k, v: (B, H, T, D) on the CPU, float32 or float64 (check `fused_entropy_unsupported`).
    scale defaults to 1/sqrt(D). Returns y (B, H, T, D) and the row entropies (B, H, T).
    """
    return attention_with_entropy_kv(q, torch.cat([k, v], -1), scale)
