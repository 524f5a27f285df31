"""Attention entropy (paper Section 3, Eq. 7), head bands, diagnosis, and the entropy regulariser.

Conventions: entropies are in nats; the maximum is ``log T`` (the paper's E_max, which ignores
that a causal row i can reach only ``log(i + 1)``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

# ---------------------------------------------------------------------------------------
# Entropy of attention rows


def softmax_with_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits) and its Shannon entropy along the last axis, from one log-softmax.

    Masked entries must hold a large finite negative value (not -inf), so that p = 0 there.
    Entries with p = 0 are dropped from the sum through `where`, which also keeps their
    gradient exactly 0: the naive p * log p would pass log p ~ -3e38 backwards and overflow
    to inf (then NaN) as soon as the upstream gradient exceeds 1.
    logits (..., T) -> probs (..., T), entropy (...,)
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    plogp = p * torch.where(p > 0, logp, torch.zeros_like(logp))
    return p, -plogp.sum(dim=-1)


def row_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis. logits (..., T) -> (...,)"""
    return softmax_with_entropy(logits)[1]


def row_entropy(probs: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Entropy of probability rows, ``-sum_j p_j log(p_j + eps)``; zeros contribute 0.

    probs (..., T) -> (...,)
    """
    p = probs.float()
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return -(p * torch.log(safe + eps)).sum(dim=-1)


def head_entropy(probs: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Eq. 7: mean over query rows (and the batch) of each row's entropy.

    probs (B, H, T, T) -> (H,)
    """
    return row_entropy(probs, eps).mean(dim=(0, 2))


def max_entropy(seq_len: int) -> float:
    """E_max = log T."""
    return math.log(seq_len)


def uniform_causal_entropy(seq_len: int, window: int | None = None) -> float:
    """Head entropy of a causal head that attends uniformly: mean over rows of log(i + 1), or of
    log(min(i + 1, window)) under sliding-window attention (Mistral): the largest query-averaged
    entropy such a head can reach."""
    return float(causal_row_ceiling(seq_len, window).mean())


def causal_row_ceiling(seq_len: int, window: int | None = None) -> torch.Tensor:
    """Each query row's entropy ceiling under a causal mask: log(min(i + 1, window)), i = 0..T-1.

    Row i sees keys 0..i, or only the last `window` of them with sliding-window attention; the
    uniform distribution over those keys is the most entropy the row can have. -> (T,) float64
    """
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be a positive number of keys (or None for full causal attention), got {window}")
    keys = torch.arange(1, int(seq_len) + 1, dtype=torch.float64)
    if window is not None:
        keys = keys.clamp(max=int(window))
    return keys.log()


# ---------------------------------------------------------------------------------------
# Head bands (Figure 2a) and diagnosis

BAND_LABELS = ("[0, max/4)", "[max/4, max/2)", "[max/2, 3max/4)", "[3max/4, max]")


def head_bands(entropy: torch.Tensor, reference: float | None = None) -> list[float]:
    """Fraction of heads in each quarter of [0, reference] (Figure 2a).

    `reference` defaults to the largest head entropy in the model (the paper's choice);
    pass ``log T`` for absolute bands. entropy: any shape, e.g. (L, H).
    """
    e = entropy.detach().float().flatten()
    ref = float(e.max()) if reference is None else float(reference)
    if ref <= 0:
        return [1.0, 0.0, 0.0, 0.0]
    idx = torch.clamp((e / ref * 4).floor().long(), 0, 3)
    counts = torch.bincount(idx, minlength=4).float()
    return (counts / e.numel()).tolist()


@dataclass
class Diagnosis:
    """Which layers and heads show entropic overload or entropy collapse, and the rule used."""

    e_max: float
    overload_threshold: float
    collapse_threshold: float
    overloaded_heads: list[tuple[int, int]] = field(default_factory=list)
    collapsed_heads: list[tuple[int, int]] = field(default_factory=list)
    overloaded_layers: list[int] = field(default_factory=list)
    collapsed_layers: list[int] = field(default_factory=list)
    criteria: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [self.criteria]
        lines.append(
            "entropic overload: "
            + (f"layers {self.overloaded_layers}" if self.overloaded_layers else "none")
            + f" ({len(self.overloaded_heads)} heads)"
        )
        lines.append(
            "entropy collapse: "
            + (f"layers {self.collapsed_layers}" if self.collapsed_layers else "none")
            + f" ({len(self.collapsed_heads)} heads)"
        )
        return "\n".join(lines)


def diagnose(
    entropy: torch.Tensor,
    seq_len: int,
    overload_frac: float = 0.75,
    collapse_frac: float = 0.25,
    layer_share: float = 0.5,
    *,
    reference: float | None = None,
    reference_label: str | None = None,
) -> Diagnosis:
    """Name overloaded and collapsed heads and layers.

    A head is overloaded when its entropy is at least ``overload_frac * log T`` (the top band of
    Figure 2a measured against the absolute maximum), collapsed when below ``collapse_frac * log T``.
    A layer is flagged when at least ``layer_share`` of its heads are.
    entropy: (L, H).
    reference: what the two fractions are of, in nats, when not log T (e.g. the uniform causal
    head's entropy); reference_label: how the criteria text introduces it.
    """
    e = entropy.detach().float()
    e_max = max_entropy(seq_len)
    ref = e_max if reference is None else float(reference)
    hi, lo = overload_frac * ref, collapse_frac * ref
    over = (e >= hi)
    coll = (e < lo)
    # the wording the saved analyses (entropy.json, reports) already carry, for either reference
    op, unit = ("*E_max", "") if reference is None else (" x reference", " nats")
    label = reference_label or (f"E_max = log T = {e_max:.3f} nats (T={seq_len})" if reference is None
                                else f"Reference = {ref:.3f} nats (T={seq_len})")
    d = Diagnosis(
        e_max=e_max,
        overload_threshold=hi,
        collapse_threshold=lo,
        overloaded_heads=[tuple(x) for x in over.nonzero().tolist()],
        collapsed_heads=[tuple(x) for x in coll.nonzero().tolist()],
        overloaded_layers=[l for l in range(e.shape[0]) if over[l].float().mean() >= layer_share],
        collapsed_layers=[l for l in range(e.shape[0]) if coll[l].float().mean() >= layer_share],
        criteria=(
            f"{label}. A head is overloaded if E >= {overload_frac:g}{op} = {hi:.3f}{unit}, collapsed if "
            f"E < {collapse_frac:g}{op} = {lo:.3f}{unit}; a layer is flagged when >= {layer_share:.0%} of its heads are."
        ),
    )
    return d


# ---------------------------------------------------------------------------------------
# The entropy regulariser (Algorithm 1)


def _gated_squared_deviation(
    entropy: torch.Tensor, thresholds: torch.Tensor, seq_len: int, gamma: float,
    e_max: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """(E - theta * E_max)^2 where |E - theta * E_max| > gamma * E_max, else 0; entropy's shape.
    E_max is log T unless given: a number, or (N,) per measurement of (L, H, N) entropies."""
    if e_max is None:
        e_max = max_entropy(seq_len)
    target = thresholds.unsqueeze(-1) * e_max if entropy.dim() == 3 else thresholds * e_max
    dev = entropy - target
    return torch.where(dev.abs() > gamma * e_max, dev.square(), torch.zeros_like(dev))


def entropy_penalty(
    entropy: torch.Tensor,
    thresholds: torch.Tensor,
    seq_len: int,
    gamma: float = 0.2,
    reduction: str = "sum",
    e_max: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The entropy regulariser's penalty: a tolerance-gated squared deviation from each head's
    learnable target theta * log T, reduced over the measurements, then averaged over heads and
    then over layers (Algorithm 1, lines 15 and 18).

    entropy: (L, H), each head's query-averaged entropy ('head' mode, Algorithm 1 as printed), or
    (L, H, N), the entropies of N individual query rows ('query' mode, Appendix B's code).
    reduction ('query' mode): 'sum' over the N rows, as the authors' code does and the magnitude
    their lambda was tuned for; 'mean' divides that by N.
    thresholds: (L, H); each layer uses its own (the released code reused layer 0's).
    e_max: the ceiling that thresholds and tolerance are fractions of; default log T (the paper's),
    or e.g. each query row's causal ceiling, (N,) in 'query' mode (see `causal_row_ceiling`).
    Returns a scalar (unweighted; the caller multiplies by lambda).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"entropy_penalty: unknown reduction {reduction!r}; valid: 'sum', 'mean'")
    penalty = _gated_squared_deviation(entropy, thresholds, seq_len, gamma, e_max)
    if penalty.dim() == 3:
        penalty = penalty.sum(dim=-1) if reduction == "sum" else penalty.mean(dim=-1)
    return penalty.mean(dim=1).mean(dim=0)


@torch.no_grad()
def outside_tolerance(entropy: torch.Tensor, thresholds: torch.Tensor, seq_len: int, gamma: float,
                      e_max: float | torch.Tensor | None = None) -> torch.Tensor:
    """Share of the penalised measurements (heads, or query rows) outside their tolerance band:
    the share on which the regulariser currently acts. 0 means its gradient is exactly 0.
    A 0-d tensor on the entropies' device: reading it is left to the caller (no sync per forward)."""
    return (_gated_squared_deviation(entropy, thresholds, seq_len, gamma, e_max) > 0).float().mean()
