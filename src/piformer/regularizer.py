"""The entropy regulariser as a loss module for any transformer (the paper's remedy, Algorithm 1).

`EntropyRegularizer` holds the per-layer, per-head learnable thresholds theta (L, H) and turns one
forward pass's attention into the penalty that PiGPT adds to its loss: each head's (or each query
row's) entropy is pulled towards theta * E_max once it leaves the tolerance band gamma * E_max.
It takes what any model can give:

    attention probabilities, one (B, H, T, T) tensor per layer (HF: output_attentions=True), or
    row entropies, one (B, H, T) tensor per layer (e.g. from a fused attention kernel).

The formulas are `piformer.entropy`'s (`entropy_penalty`, `row_entropy`); PiGPT's built-in
regulariser uses the same ones, so for the same entropies and thresholds both give the same number.

    reg = EntropyRegularizer(n_layer=12, n_head=12)
    out = model(input_ids, labels=labels, output_attentions=True)
    loss = out.loss + 1e-5 * reg(out.attentions).penalty
    optimizer = torch.optim.AdamW([*model.parameters(), *reg.parameters()])

Ceilings (E_max). 'logT' (default) is the paper's log T, or log(min(T, window)) with a sliding
window. 'causal' gives query row i its own reachable ceiling, log(min(i + 1, window)) (row i of a
causal mask sees i + 1 keys): a threshold then means the same share of what each row can reach.
With an attention mask (padding), only real query rows count, and under 'causal' a row's
ceiling counts only the real keys it can see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .entropy import causal_row_ceiling, entropy_penalty, outside_tolerance, row_entropy

MODES = ("query", "head")
REDUCTIONS = ("sum", "mean")
CEILINGS = ("logT", "causal")


@dataclass
class RegularizerOutput:
    """One evaluation of the regulariser."""

    penalty: torch.Tensor
    """Unweighted penalty, a scalar with gradient (the caller multiplies by lambda)."""
    outside: torch.Tensor
    """Share of the penalised measurements outside their tolerance band (0-d, no gradient)."""
    head_entropy: torch.Tensor
    """(L, H) mean entropy per head over the counted query rows (Eq. 7), detached."""


class EntropyRegularizer(nn.Module):
    """Tolerance-gated squared deviation of attention entropy from learnable per-head targets.

    n_layer, n_head: shape of the thresholds (L, H); every layer has its own.
    gamma: tolerance as a fraction of E_max; no penalty while |E - theta E_max| <= gamma E_max.
    mode: 'query' penalises every query row (the authors' code, Appendix B), 'head' each head's
        query-averaged entropy (Algorithm 1 as printed).
    reduction: 'sum' or 'mean' over a head's query rows ('query' mode; 'head' mode averages).
    threshold_init: initial theta (target = theta * E_max).
    ceiling: 'logT' or 'causal' (see the module docstring).
    window: sliding-window span, one int for every layer or one per layer (None: full attention).
    The sequence length T is read from each input, as PiGPT does, so one module serves every T.
    """

    def __init__(
        self,
        n_layer: int,
        n_head: int,
        *,
        gamma: float = 0.2,
        mode: str = "query",
        reduction: str = "sum",
        threshold_init: float = 0.5,
        ceiling: str = "logT",
        window: int | Sequence[int | None] | None = None,
    ):
        super().__init__()
        if int(n_layer) < 1 or int(n_head) < 1:
            raise ValueError(f"EntropyRegularizer needs n_layer >= 1 and n_head >= 1, got {n_layer} and {n_head}")
        for name, value, valid in (("mode", mode, MODES), ("reduction", reduction, REDUCTIONS),
                                   ("ceiling", ceiling, CEILINGS)):
            if value not in valid:
                raise ValueError(f"EntropyRegularizer: unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")
        if not (gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"EntropyRegularizer: gamma must be a finite number >= 0, got {gamma}")
        windows = list(window) if isinstance(window, Sequence) else [window] * int(n_layer)
        if len(windows) != int(n_layer):
            raise ValueError(f"EntropyRegularizer: {len(windows)} windows given for {n_layer} layers; give one per layer or one int")
        for w in windows:
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise ValueError(f"EntropyRegularizer: window must be a positive int or None, got {w!r}")
        self.n_layer, self.n_head = int(n_layer), int(n_head)
        self.gamma, self.mode, self.reduction, self.ceiling = float(gamma), mode, reduction, ceiling
        self.windows: list[int | None] = windows
        self.thresholds = nn.Parameter(torch.full((self.n_layer, self.n_head), float(threshold_init)))

    def extra_repr(self) -> str:
        w = self.windows[0] if len(set(self.windows)) == 1 else self.windows
        return (f"n_layer={self.n_layer}, n_head={self.n_head}, gamma={self.gamma}, mode={self.mode!r}, "
                f"reduction={self.reduction!r}, ceiling={self.ceiling!r}, window={w}")

    # -- inputs -----------------------------------------------------------------------------
    def _row_entropies(self, attentions, entropies) -> torch.Tensor:
        """(L, B, H, T) row entropies from exactly one of the two inputs."""
        if (attentions is None) == (entropies is None):
            raise ValueError("EntropyRegularizer: give exactly one of attentions (per layer (B, H, T, T)) "
                             "or entropies (per layer (B, H, T))")
        given = attentions if attentions is not None else entropies
        what, rank = ("attentions", 4) if attentions is not None else ("entropies", 3)
        layers = list(given.unbind(0)) if isinstance(given, torch.Tensor) else list(given)
        if len(layers) != self.n_layer or any(x is None for x in layers):
            raise ValueError(
                f"EntropyRegularizer: {what} for {len(layers)} layers (None for {sum(x is None for x in layers)}), "
                f"expected a tensor for each of {self.n_layer}; HF models return them only with "
                "output_attentions=True and attn_implementation='eager'"
            )
        shape = tuple(layers[0].shape)
        if len(shape) != rank or shape[1] != self.n_head or any(tuple(x.shape) != shape for x in layers):
            want = "(B, H, T, T)" if rank == 4 else "(B, H, T)"
            raise ValueError(f"EntropyRegularizer: {what} must be {want} per layer with H={self.n_head}, "
                             f"got shapes {sorted({tuple(x.shape) for x in layers})}")
        if rank == 4 and shape[2] != shape[3]:
            raise ValueError(f"EntropyRegularizer: attentions must be square over (T, T), got {shape}")
        if rank == 4:
            return torch.stack([row_entropy(p) for p in layers])
        return torch.stack([e.float() for e in layers])

    def _ceiling(self, T: int, window: int | None, mask: torch.Tensor | None, device) -> torch.Tensor | float:
        """E_max for a layer with this window: a number ('logT') or (B, T) per query row ('causal')."""
        if self.ceiling == "logT":
            return math.log(min(T, window) if window is not None else T)
        if mask is None:
            return causal_row_ceiling(T, window).to(device=device, dtype=torch.float32).expand(1, T)
        # the keys row i reaches: the real ones among the last `window` positions up to i
        seen = mask.cumsum(-1)
        if window is not None and window < T:
            seen = seen - torch.nn.functional.pad(seen, (window, 0))[:, :T]
        return seen.clamp(min=1).float().log()

    # -- the penalty ------------------------------------------------------------------------
    def forward(
        self,
        attentions: Sequence[torch.Tensor] | torch.Tensor | None = None,
        *,
        entropies: Sequence[torch.Tensor] | torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> RegularizerOutput:
        """The penalty for one forward pass.

        attentions: per layer (B, H, T, T) probabilities (a tuple, or one (L, B, H, T, T) tensor);
        entropies: per layer (B, H, T) row entropies instead. attention_mask: (B, T), 1 for real
        tokens, 0 for padding; padded query rows are not penalised.
        """
        ent = self._row_entropies(attentions, entropies)  # (L, B, H, T)
        L, B, H, T = ent.shape
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"EntropyRegularizer: attention_mask must be (B, T) = {(B, T)}, got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=ent.device).long()
        keep = None if mask is None else mask.bool().reshape(-1)  # (B*T,) the counted query rows
        rows = ent.permute(0, 2, 1, 3).reshape(L, H, B * T)  # every query row of every sequence
        if keep is not None:
            rows = rows[..., keep]
        if rows.shape[-1] == 0:
            raise ValueError("EntropyRegularizer: attention_mask leaves no query row to regularise")
        head_entropy = rows.mean(dim=-1)  # (L, H), Eq. 7 over the counted rows
        thresholds = self.thresholds.to(ent.dtype)

        # Layers that share a window share their ceilings and go through entropy_penalty together
        # (one call when all do, as in PiGPT); otherwise one layer at a time, and the layer mean
        # below is the one entropy_penalty would have taken.
        groups = [list(range(L))] if len(set(self.windows)) == 1 else [[l] for l in range(L)]
        penalties, outside = [], []
        for group in groups:
            ceil = self._ceiling(T, self.windows[group[0]], mask, ent.device)
            if isinstance(ceil, torch.Tensor):
                ceil = ceil.expand(B, T).reshape(-1)
                ceil = ceil if keep is None else ceil[keep]
            theta = thresholds[group]
            if self.mode == "head":
                measured, reduction = head_entropy[group], "mean"
                ceil = ceil.mean() if isinstance(ceil, torch.Tensor) else ceil
            else:
                measured, reduction = rows[group], self.reduction
            penalties.append(entropy_penalty(measured, theta, T, self.gamma, reduction, e_max=ceil))
            outside.append(outside_tolerance(measured.detach(), theta.detach(), T, self.gamma, e_max=ceil))
        return RegularizerOutput(
            penalty=penalties[0] if len(groups) == 1 else torch.stack(penalties).mean(),
            outside=outside[0] if len(groups) == 1 else torch.stack(outside).mean(),
            head_entropy=head_entropy.detach(),
        )


def hf_layer_windows(config) -> list[int | None]:
    """Each layer's sliding-window attention span (None: full causal attention), from a HF config.

    Mistral slides in every layer (``sliding_window``); configs with ``layer_types`` (Qwen2,
    Gemma 2/3) slide only in their 'sliding_attention' layers; ``use_sliding_window=False``
    (Qwen2) switches it off. Row i of a sliding layer sees at most `window` keys, so its entropy
    ceiling is log(min(i + 1, window)). Reads attributes only: no `transformers` import.
    """
    n_layer = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layer, int) or n_layer < 1:
        raise ValueError(f"{type(config).__name__} names no num_hidden_layers; cannot tell each layer's attention span")
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False or not (
        isinstance(window, int) and not isinstance(window, bool) and window > 0
    ):
        return [None] * n_layer
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n_layer:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n_layer
