"""Causal attention that also returns each query row's entropy, without keeping the (T, T) matrix.

    y, row_entropy = attention_with_entropy(q, k, v)   # (B, H, T, D), (B, H, T)

For row i with logits s_ij = scale * q_i . k_j and p_i = softmax(s_i) over the causal keys j <= i,

    H_i = -sum_j p_ij log p_ij = lse_i - sum_j p_ij s_ij = lse_i - scale * q_i . (P K)_i,

so an attention pass that sums p_ij s_ij (or forms P K) beside P V and keeps the log-sum-exp lse
gives the entropy with no probability matrix. Backward: H_i depends on row i's logits alone, with
dH_i/ds_ij = -p_ij (s_ij - E_i[s]), so with upstream gradients dy and dH the logits' gradient is

    dS_ij = p_ij (dy_i . v_j - dH_i s_ij - c_i),   c_i = dy_i . y_i - dH_i E_i[s],

and dQ = scale dS K, dK = scale dS^T Q, dV = P^T dy as in any attention backward.

Two kernels compute this, both exact (the explicit path in model.py is their test oracle):

- "cpp" (csrc/entropy_attention.cpp, compiled for this machine at first use, about 30 s, then
  cached by torch.utils.cpp_extension): per (batch, head), query rows in blocks of 32 meet only
  their causal keys; the pass that exponentiates a tile also sums p_ij s_ij, so the forward does
  SDPA's two products (Q K^T, P V) at head width D; backward recomputes P from the saved lse.
  Keeps O(B H T D) for backward. The default.
- "flash": PyTorch's CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`). It
  wants one head width for queries, keys and values, so the pass runs at width 2D with queries
  [q | 0] and one tensor kv = [k | v] as both keys and values: [q | 0] . [k_j | v_j] = q . k_j,
  and its output is P [K | V]. Its backward, fed dO = [-scale dH_i q_i | dy], forms exactly the
  dS above (dO V'^T gains -dH_i s_ij, its D_i gains -dH_i E_i[s]); of its dV, the keys' half
  belongs to no real input and is dropped. About twice SDPA's cost (the zero half and the
  padded products); used where the C++ kernel cannot be built, or when asked for with
  PIFORMER_ENTROPY_KERNEL=flash.

q, k and v may be strided views (as a projection's output transposed to (B, H, T, D) is); the
C++ kernel reads them in place.

`fused_entropy_unsupported(q, dropout_p)` says why neither kernel can run (another device, a
half-precision dtype, dropout on the probabilities); callers then fall back to the explicit
path and say so once (`warn_fallback_once`).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from .kernels import KernelUnavailable, load_kernel

KERNELS = ("cpp", "flash")
KERNEL_ENV = "PIFORMER_ENTROPY_KERNEL"  # force one of KERNELS (benchmarks compare them)
_QUERY_BLOCK = 32  # query rows per tile of the C++ kernel: fastest or tied of 16-128 at T=128 (D=32, 64) and T=1024
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


def entropy_kernel(requested: str | None = None) -> str:
    """Which kernel `attention_with_entropy` runs: `requested`, else $PIFORMER_ENTROPY_KERNEL, else
    "cpp" when it builds here; "flash" otherwise (the build failure is said once)."""
    choice = requested or os.environ.get(KERNEL_ENV) or "cpp"
    if choice not in KERNELS:
        raise ValueError(f"unknown entropy attention kernel {choice!r} (from {KERNEL_ENV} or the caller); "
                         f"valid: {', '.join(KERNELS)}")
    if choice == "cpp":
        try:
            load_kernel("entropy_attention")
        except KernelUnavailable as e:
            _warn_once(f"attention entropy: the C++ kernel is unavailable ({e}); using PyTorch's flash "
                       "kernel at width 2D instead (exact, about 1.7x slower per attention)")
            return "flash"
    return choice


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def warn_fallback_once(reason: str) -> None:
    """One warning per distinct reason per process: the explicit path keeps (B, H, T, T) for backward."""
    _warn_once(f"attention entropy: using the explicit (B, H, T, T) path because of {reason}; "
               "memory grows with T^2 and the step is slower")


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _CppAttentionWithEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        # Read in place, strided as the projections left them: copying them contiguous first was
        # measured slower in forward and in backward.
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        y, ent, lse, es = load_kernel("entropy_attention").forward(q, k, v, scale, _QUERY_BLOCK)
        ctx.save_for_backward(q, k, v, y, lse, es)  # O(B H T D): no probabilities
        ctx.scale = scale
        return y, ent

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dent: torch.Tensor | None):
        q, k, v, y, lse, es = ctx.saved_tensors
        dy = torch.zeros_like(y) if dy is None else _unit_last_stride(dy)
        dent = torch.zeros_like(lse) if dent is None else dent.contiguous()
        dq, dk, dv = (torch.empty_like(y) for _ in range(3))  # the kernel writes every element
        load_kernel("entropy_attention").backward(dy, dent, q, k, v, y, lse, es, ctx.scale, _QUERY_BLOCK, dq, dk, dv)
        return dq, dk, dv, None


class _FlashAttentionWithEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        D = q.shape[-1]
        kv = torch.cat([k, v], -1)  # (B, H, T, 2D): keys and values of the 2D-wide pass
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
        # The keys' half of dk is the keys' gradient (its values' half is 0: the queries' zero half
        # meets it); the values' half of dv is the values' gradient (its keys' half belongs to K
        # used as a value, no real input: the entropy depends on K only through the logits).
        return dqp[..., :D], dk[..., :D], dv[..., D:], None


def attention_with_entropy(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, kernel: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention and each row's entropy (nats), fused; differentiable in q, k, v.

    q, k, v: (B, H, T, D) on the CPU, float32 or float64 (check `fused_entropy_unsupported`);
    strided views are fine. scale defaults to 1/sqrt(D); kernel is one of KERNELS (default: see
    `entropy_kernel`). Returns y (B, H, T, D) and the row entropies (B, H, T).
    """
    reason = fused_entropy_unsupported(q)
    if reason is not None:
        raise ValueError(f"attention_with_entropy: unsupported input: {reason}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention_with_entropy: q, k and v must share one (B, H, T, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    fn = _CppAttentionWithEntropy if entropy_kernel(kernel) == "cpp" else _FlashAttentionWithEntropy
    return fn.apply(q, k, v, scale)
