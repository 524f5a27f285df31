"""What an entropy analysis of one model says: per-head entropy, bands, diagnosis, and extras.

`analyse_entropy(head_entropy, seq_len)` turns an ``(L, H)`` matrix of Eq. 7 entropies into an
`EntropyResult`: the four head bands of Figure 2a (relative to the largest head entropy, the
paper's convention, and relative to ``log T``), per-layer statistics, and the overload /
collapse diagnosis of `piformer.entropy.diagnose`, with the criteria spelled out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..entropy import BAND_LABELS, Diagnosis, diagnose, head_bands, max_entropy, uniform_causal_entropy

REFERENCES = ("logT", "causal")
"""What the diagnosis thresholds are fractions of: 'logT' (E_max = log T, the paper's convention)
or 'causal' (the entropy of a causal head that attends uniformly, mean_i log(i + 1): the largest
query-averaged entropy a causal head can actually reach)."""


@dataclass
class EntropyHistory:
    """Mean head entropy per layer over training steps (from metrics.jsonl)."""

    steps: list[int]
    layer_mean: np.ndarray
    """(S, L) mean over heads of the logged per-head entropy, nats."""

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "layer_mean": _jsonable(self.layer_mean)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EntropyHistory":
        return cls(steps=[int(s) for s in d["steps"]], layer_mean=_array(d["layer_mean"]))


@dataclass
class EntropyResult:
    """The entropy analysis of one model (a piformer run, a checkpoint, or a HF model)."""

    name: str
    """Label used in tables and figures (the run's preset when known, else its directory name)."""
    head_entropy: np.ndarray
    """(L, H) attention entropy per head, nats (Eq. 7: mean over query rows and sequences)."""
    seq_len: int
    """T, the number of tokens per measured sequence."""
    source: str = ""
    """Where the model came from (run directory, checkpoint or HF model directory)."""
    kind: str = "piformer"
    """'piformer', 'hf' or 'synthetic'."""
    preset: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    """Data directory (or text file) the validation tokens came from."""
    n_sequences: int = 0
    """Validation sequences the entropies were averaged over."""

    # derived by analyse_entropy
    e_max: float = 0.0
    """log T, nats."""
    causal_ceiling: float = 0.0
    """Entropy of a uniformly attending causal head, mean_i log(i + 1), nats: the highest Eq. 7 value
    a causal head can reach (the paper ignores this and uses log T)."""
    max_head_entropy: float = float("nan")
    """The largest head entropy in the model: the 'max' of Figure 2a's bands."""
    bands_max: list[float] = field(default_factory=list)
    """Fractions of heads in [0, max/4), [max/4, max/2), [max/2, 3max/4), [3max/4, max] (Figure 2a)."""
    bands_logt: list[float] = field(default_factory=list)
    """The same four bands with max replaced by log T."""
    layer_mean: list[float] = field(default_factory=list)
    layer_min: list[float] = field(default_factory=list)
    layer_max: list[float] = field(default_factory=list)
    diagnosis: Diagnosis | None = None
    reference: str = "logT"
    notes: list[str] = field(default_factory=list)
    """Caveats found while analysing (non-finite entropies, short contexts, missing logs...)."""

    # extras read from a piformer run
    thresholds: np.ndarray | None = None
    """(L, H) learned threshold weights theta of the entropy regulariser (target = theta * log T)."""
    temperature: dict[str, list[float]] | None = None
    """Per-layer statistics of the learned softmax temperatures over heads and positions:
    keys mean, std, min, max, p05, p50, p95 (each a list of length L)."""
    history: EntropyHistory | None = None
    status: dict[str, Any] | None = None
    """The run's status.json (e.g. finished, or diverged at step N), when there is one."""

    @property
    def n_layer(self) -> int:
        return int(self.head_entropy.shape[0])

    @property
    def n_head(self) -> int:
        return int(self.head_entropy.shape[1])

    @property
    def mean_entropy(self) -> float:
        finite = self.head_entropy[np.isfinite(self.head_entropy)]
        return float(finite.mean()) if finite.size else float("nan")

    @property
    def status_text(self) -> str:
        """One word or phrase for tables: 'diverged at step N', 'finished', ... or ''."""
        s = self.status or {}
        state = s.get("status") or s.get("state") or ""
        step = s.get("diverged_at", s.get("step"))
        if state == "diverged" and step is not None:
            return f"diverged at step {step}"
        return str(state)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (non-finite numbers become null)."""
        d = self.diagnosis
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "preset": self.preset,
            "checkpoint": self.checkpoint,
            "data": self.data,
            "n_sequences": self.n_sequences,
            "seq_len": self.seq_len,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "units": "nats",
            "head_entropy": _jsonable(self.head_entropy),
            "e_max": self.e_max,
            "causal_ceiling": self.causal_ceiling,
            "max_head_entropy": _num(self.max_head_entropy),
            "mean_entropy": _num(self.mean_entropy),
            "band_labels": list(BAND_LABELS),
            "bands_max": _jsonable(self.bands_max),
            "bands_logt": _jsonable(self.bands_logt),
            "layer_mean": _jsonable(self.layer_mean),
            "layer_min": _jsonable(self.layer_min),
            "layer_max": _jsonable(self.layer_max),
            "reference": self.reference,
            "diagnosis": None if d is None else {
                **d.to_dict(),
                "overloaded_heads": [list(h) for h in d.overloaded_heads],
                "collapsed_heads": [list(h) for h in d.collapsed_heads],
            },
            "notes": list(self.notes),
            "thresholds": None if self.thresholds is None else _jsonable(self.thresholds),
            "threshold_layer_mean": None if self.thresholds is None else _jsonable(self.thresholds.mean(axis=1)),
            "threshold_layer_var": None if self.thresholds is None else _jsonable(self.thresholds.var(axis=1)),
            "temperature": None if self.temperature is None else {k: _jsonable(v) for k, v in self.temperature.items()},
            "history": None if self.history is None else self.history.to_dict(),
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EntropyResult":
        """Rebuild a result from `to_dict()` output (e.g. a saved `--json`)."""
        diag = d.get("diagnosis")
        diagnosis = None
        if diag is not None:
            diagnosis = Diagnosis(**{
                **diag,
                "overloaded_heads": [tuple(h) for h in diag["overloaded_heads"]],
                "collapsed_heads": [tuple(h) for h in diag["collapsed_heads"]],
            })
        return cls(
            name=d["name"], head_entropy=_array(d["head_entropy"]), seq_len=int(d["seq_len"]),
            source=d.get("source", ""), kind=d.get("kind", "piformer"), preset=d.get("preset"),
            checkpoint=d.get("checkpoint"), data=d.get("data"), n_sequences=int(d.get("n_sequences", 0)),
            e_max=float(d["e_max"]), causal_ceiling=float(d["causal_ceiling"]),
            max_head_entropy=_float(d.get("max_head_entropy")),
            bands_max=[_float(x) for x in d["bands_max"]], bands_logt=[_float(x) for x in d["bands_logt"]],
            layer_mean=[_float(x) for x in d["layer_mean"]], layer_min=[_float(x) for x in d["layer_min"]],
            layer_max=[_float(x) for x in d["layer_max"]], diagnosis=diagnosis,
            reference=d.get("reference", "logT"), notes=list(d.get("notes", [])),
            thresholds=None if d.get("thresholds") is None else _array(d["thresholds"]),
            temperature=None if d.get("temperature") is None else {
                k: [_float(x) for x in v] for k, v in d["temperature"].items()},
            history=None if d.get("history") is None else EntropyHistory.from_dict(d["history"]),
            status=d.get("status"),
        )


def analyse_entropy(
    head_entropy: torch.Tensor | np.ndarray | list,
    seq_len: int,
    *,
    name: str = "model",
    reference: str = "logT",
    overload_frac: float = 0.75,
    collapse_frac: float = 0.25,
    layer_share: float = 0.5,
    window: int | None = None,
    **fields: Any,
) -> EntropyResult:
    """Bands, per-layer statistics and diagnosis of an ``(L, H)`` head-entropy matrix (nats).

    reference: 'logT' (default, the paper's E_max) or 'causal' (the uniform causal head's
    entropy); the diagnosis thresholds are ``overload_frac`` and ``collapse_frac`` times it.
    A layer is flagged when at least ``layer_share`` of its heads are. window: the model's
    sliding-window attention span (Mistral), which lowers the causal ceiling to mean_i log(min(i+1, window)).
    Extra keyword arguments set other `EntropyResult` fields (source, thresholds, history, ...).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference: unknown value {reference!r}; valid: {', '.join(map(repr, REFERENCES))}")
    if int(seq_len) < 2:
        raise ValueError(f"seq_len must be >= 2 to measure attention entropy, got {seq_len}")
    e = np.asarray(head_entropy.detach().cpu() if isinstance(head_entropy, torch.Tensor) else head_entropy,
                   dtype=np.float64)
    if e.ndim != 2 or e.size == 0:
        raise ValueError(f"head_entropy must be a non-empty (layers, heads) matrix, got shape {e.shape}")
    seq_len = int(seq_len)
    e_max = max_entropy(seq_len)
    ceiling = uniform_causal_entropy(seq_len, window)
    notes: list[str] = list(fields.pop("notes", []))

    finite = np.isfinite(e)
    if not finite.all():
        bad = [tuple(map(int, ij)) for ij in np.argwhere(~finite)]
        notes.append(
            f"{len(bad)} of {e.size} head entropies are not finite (NaN/inf: the weights have diverged); "
            f"bands and layer statistics use the finite heads only. First non-finite (layer, head): {bad[:5]}"
        )
    ef = torch.from_numpy(e[finite])
    if ef.numel():
        max_head = float(ef.max())
        bands_max = head_bands(ef)
        bands_logt = head_bands(ef, reference=e_max)
    else:
        max_head = float("nan")
        bands_max = bands_logt = [float("nan")] * 4

    ref_name = "E_max = log T" if reference == "logT" else (
        "C = mean_i log(i+1) (uniform causal head)" if window is None
        else f"C = mean_i log(min(i+1, {window})) (uniform sliding-window head)")
    ref_value = e_max if reference == "logT" else ceiling
    # the rule itself (thresholds, layer share, its wording) is entropy.diagnose's alone
    diag = diagnose(torch.from_numpy(np.where(finite, e, np.nan)), seq_len,
                    overload_frac=overload_frac, collapse_frac=collapse_frac, layer_share=layer_share,
                    reference=ref_value,
                    reference_label=f"Reference {ref_name} = {ref_value:.3f} nats (T={seq_len}; log T = "
                                    f"{e_max:.3f}, uniform causal head = {ceiling:.3f})")
    if reference == "logT" and ceiling < diag.overload_threshold:
        notes.append(
            f"At T={seq_len} no causal head can reach the overload threshold: uniform attention over the "
            f"reachable prefix gives {ceiling:.3f} nats = {ceiling / e_max:.2f} log T < {overload_frac:g} log T, "
            f"so overload against log T is undetectable at this context length; measure at a longer T "
            f"or use reference='causal' (CLI: --reference causal)."
        )

    with np.errstate(all="ignore"):
        masked = np.where(finite, e, np.nan)
        layer_mean = [_float(x) for x in _nan_reduce(np.nanmean, masked)]
        layer_min = [_float(x) for x in _nan_reduce(np.nanmin, masked)]
        layer_max = [_float(x) for x in _nan_reduce(np.nanmax, masked)]

    return EntropyResult(
        name=name, head_entropy=e, seq_len=seq_len, e_max=e_max, causal_ceiling=ceiling,
        max_head_entropy=max_head, bands_max=[float(x) for x in bands_max],
        bands_logt=[float(x) for x in bands_logt], layer_mean=layer_mean, layer_min=layer_min,
        layer_max=layer_max, diagnosis=diag, reference=reference, notes=notes, **fields,
    )


def temperature_stats(temps: torch.Tensor | np.ndarray) -> dict[str, list[float]]:
    """Per-layer statistics over heads and positions of learned temperatures ``(L, H, T)``."""
    t = np.asarray(temps.detach().cpu() if isinstance(temps, torch.Tensor) else temps, dtype=np.float64)
    flat = t.reshape(t.shape[0], -1)
    q = np.quantile(flat, [0.05, 0.5, 0.95], axis=1)
    return {
        "mean": flat.mean(axis=1).tolist(), "std": flat.std(axis=1).tolist(),
        "min": flat.min(axis=1).tolist(), "max": flat.max(axis=1).tolist(),
        "p05": q[0].tolist(), "p50": q[1].tolist(), "p95": q[2].tolist(),
    }


# ---------------------------------------------------------------------------------------
# JSON helpers


def _nan_reduce(fn, x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape[0], np.nan)
    for i, row in enumerate(x):
        if np.isfinite(row).any():
            out[i] = fn(row)
    return out


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _jsonable(a: Any) -> Any:
    """Nested lists of floats, with NaN/inf as None."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 0:
        return _num(arr)
    if arr.ndim == 1:
        return [_num(x) for x in arr]
    return [_jsonable(x) for x in arr]


def _array(a: Any) -> np.ndarray:
    return np.array(a, dtype=np.float64)  # None -> nan
