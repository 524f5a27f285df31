"""Plain-text tables of entropy results: one block per run, and runs side by side."""

from __future__ import annotations

import math

from ..entropy import BAND_LABELS
from .result import EntropyResult

_BAND_SHORT = ("[0,1/4)", "[1/4,1/2)", "[1/2,3/4)", "[3/4,1]")


def _f(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    align = align or "l" + "r" * (len(header) - 1)

    def fmt(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def _layer_list(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if layers else "none"


def format_result(r: EntropyResult) -> str:
    """A block for one run: per-layer entropy, bands (both references), diagnosis, notes."""
    d = r.diagnosis
    head = f"== {r.name}"
    facts = [f"T={r.seq_len}", f"L={r.n_layer}", f"H={r.n_head}", f"{r.n_sequences} val sequences"]
    if r.status_text:
        facts.append(f"status: {r.status_text}")
    lines = [head, f"   {r.source}" + (f"  [checkpoint {r.checkpoint}]" if r.checkpoint else ""),
             f"   data: {r.data}  |  " + ", ".join(facts), ""]
    rows = []
    for l in range(r.n_layer):
        n_over = sum(1 for (a, _) in d.overloaded_heads if a == l) if d else 0
        n_coll = sum(1 for (a, _) in d.collapsed_heads if a == l) if d else 0
        flag = []
        if d and l in d.overloaded_layers:
            flag.append("OVERLOAD")
        if d and l in d.collapsed_layers:
            flag.append("COLLAPSE")
        rows.append([str(l), _f(r.layer_mean[l]), _f(r.layer_min[l]), _f(r.layer_max[l]),
                     f"{n_over}/{r.n_head}", f"{n_coll}/{r.n_head}", " ".join(flag)])
    lines.append(_table(["layer", "mean E", "min E", "max E", "overloaded", "collapsed", "flag"], rows,
                        align="rrrrrrl"))
    lines.append(f"(entropy in nats; log T = {r.e_max:.3f}; uniform causal head = {r.causal_ceiling:.3f}; "
                 f"model mean = {_f(r.mean_entropy)}, max head = {_f(r.max_head_entropy)})")
    lines.append("")
    lines.append("Head bands (fraction of heads):")
    lines.append(_table(
        ["reference", *BAND_LABELS],
        [[f"max head entropy = {_f(r.max_head_entropy)} (paper Fig. 2a)", *map(_pct, r.bands_max)],
         [f"log T = {r.e_max:.3f}", *map(_pct, r.bands_logt)]],
    ))
    lines.append("")
    if d is not None:
        lines.append("Diagnosis: " + d.criteria)
        lines.append(f"  entropic overload: layers {_layer_list(d.overloaded_layers)} "
                     f"({len(d.overloaded_heads)} of {r.n_layer * r.n_head} heads overloaded)")
        lines.append(f"  entropy collapse:  layers {_layer_list(d.collapsed_layers)} "
                     f"({len(d.collapsed_heads)} of {r.n_layer * r.n_head} heads collapsed)")
    if r.thresholds is not None:
        m, v = r.thresholds.mean(axis=1), r.thresholds.var(axis=1)
        lines.append("Learned thresholds theta (target entropy = theta x log T), per layer mean / variance: "
                     + ", ".join(f"{a:.3f}/{b:.2g}" for a, b in zip(m, v)))
    if r.temperature is not None:
        lines.append("Learned temperatures, per layer mean (min-max): "
                     + ", ".join(f"{a:.3g} ({lo:.3g}-{hi:.3g})" for a, lo, hi in
                                 zip(r.temperature["mean"], r.temperature["min"], r.temperature["max"])))
    for n in r.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def format_comparison(results: list[EntropyResult]) -> str:
    """Runs side by side: headline numbers, bands under both references, and per-layer means."""
    out = []
    rows = []
    for r in results:
        d = r.diagnosis
        rows.append([
            r.name, str(r.seq_len), f"{r.n_layer}x{r.n_head}", _f(r.mean_entropy), _f(r.max_head_entropy),
            *map(_pct, r.bands_max), _pct(r.bands_logt[3]), _pct(r.bands_logt[0]),
            _layer_list(d.overloaded_layers) if d else "-", _layer_list(d.collapsed_layers) if d else "-",
            r.status_text or "-",
        ])
    out.append("Comparison (entropy in nats; bands are fractions of heads relative to each run's max head "
               "entropy, as in paper Fig. 2a, and top / bottom band relative to log T):")
    out.append(_table(
        ["run", "T", "LxH", "mean E", "max E", *(f"{b} max" for b in _BAND_SHORT), "[3/4,1] logT",
         "[0,1/4) logT", "overloaded layers", "collapsed layers", "status"],
        rows, align="lrrrr" + "r" * 6 + "lll",
    ))
    n_layers = max(r.n_layer for r in results)
    lrows = []
    for l in range(n_layers):
        lrows.append([str(l)] + [_f(r.layer_mean[l]) if l < r.n_layer else "" for r in results])
    out.append("")
    out.append("Mean head entropy per layer (nats):")
    out.append(_table(["layer", *(r.name for r in results)], lrows, align="r" * (len(results) + 1)))
    if results and results[0].diagnosis is not None:
        crit = {r.diagnosis.criteria for r in results if r.diagnosis is not None}
        out.append("")
        out.append("Criteria: " + " | ".join(sorted(crit)))
    return "\n".join(out)
