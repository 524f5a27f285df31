"""Figures of the entropy analysis (matplotlib, Agg, no pyplot state): PNG and SVG.

Each ``plot_*`` function takes a list of `EntropyResult` (one or several runs, compared in one
figure), writes ``out_dir/<stem>.<fmt>`` for each format, and returns the paths written.
`make_all_figures` writes all that the results can support and returns ``{name: png_path}``;
what it could not draw (e.g. thresholds when no run uses the regulariser) is in ``.skipped``.

    figs = make_all_figures(results, "figs/")
    figs["heatmap"]      # figs/entropy_heatmap.png (and .svg beside it)
    figs.skipped         # {"thresholds": "no run has learned thresholds ..."}

Runs are told apart by `run_styles`: up to 20 distinct colours, each with its own marker (and a
dashed line past 20). Legends sit outside the plotted data, to the right or above.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from ..entropy import BAND_LABELS
from .result import EntropyResult

if TYPE_CHECKING:  # plotting reads nothing itself: the callers pass the curves
    from .curves import LossCurve

FORMATS = ("png", "svg")
DPI = 150
_SEQ_CMAP = "viridis"  # yellow = high entropy, as in the paper's heatmaps


class FigureUnavailable(ValueError):
    """The results hold nothing this figure could show (the message says what is missing)."""


class FigureSet(dict):
    """``{name: png path}`` of the figures written, plus ``skipped = {name: reason}``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}
        self.all_paths: dict[str, list[Path]] = {}


# ---------------------------------------------------------------------------------------
# helpers


def _save(fig: Figure, out_dir: str | Path, stem: str, formats: Sequence[str]) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise ValueError(f"figure formats must be among png, svg, pdf; got {list(formats)}")
    paths = []
    for fmt in formats:
        p = out / f"{stem}.{fmt}"
        meta = {"Date": None} if fmt in ("svg", "pdf") else {}
        with rc_context({"svg.hashsalt": "piformer", "svg.fonttype": "path"}):
            fig.savefig(p, format=fmt, dpi=DPI, metadata=meta)
        paths.append(p)
    return paths


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def _ticks(n: int, max_ticks: int = 12) -> list[int]:
    step = max(1, math.ceil(n / max_ticks))
    return list(range(0, n, step))


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def run_styles(n: int) -> list[dict]:
    """Line styles telling `n` runs apart: tab20's dark shades, then its light ones (20 colours,
    neighbours in the list far apart in hue), each with its own marker; past 20 the colours repeat
    with a dashed line. Keys: color, marker, linestyle."""
    tab20 = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return [{"color": tab20(order[i % 20]), "marker": _MARKERS[i % len(_MARKERS)],
             "linestyle": "-" if i < 20 else "--"} for i in range(n)]


def _legend_outside(fig: Figure, ax, title: str | None = None) -> None:
    """The axes' legend to the right of the figure, clear of the data (constrained layout)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7, title=title, title_fontsize=8,
                   ncols=1 if len(labels) <= 24 else 2)


def _require(results: Sequence[EntropyResult]) -> None:
    if not results:
        raise ValueError("no results to plot")




# ---------------------------------------------------------------------------------------
# figures


def plot_head_entropy_heatmaps(
    results: Sequence[EntropyResult],
    out_dir: str | Path,
    *,
    stem: str = "entropy_heatmap",
    formats: Sequence[str] = FORMATS,
    vmax: float | None = None,
    ncols: int | None = None,
) -> list[Path]:
    """Layers x heads heatmap of attention entropy per run, one subplot each (paper Figs 2 and 4).

    All subplots share one colour scale, 0 to `vmax` nats (default: the largest log T among the
    runs), so colours compare across runs. Layer labels of overloaded layers are drawn in red and
    those of collapsed layers in blue (the diagnosis criteria are in the caption).
    """
    _require(results)
    vmax = float(vmax) if vmax is not None else max(r.e_max for r in results)
    # Panel size grows with the grid it shows, and the figure stays about a page wide
    # (more rows, not narrower panels), so cells and their numbers keep a readable size.
    n_head, n_layer = max(r.n_head for r in results), max(r.n_layer for r in results)
    panel_w = min(5.0, max(2.6, 0.5 * n_head + 0.8))
    panel_h = min(6.0, max(2.0, 0.32 * n_layer + 0.9))
    ncols = ncols or max(1, int(12.0 // panel_w))
    nrows, ncols = _grid(len(results), ncols)
    fig = Figure(figsize=(panel_w * ncols + 1.4, panel_h * nrows + 1.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = colormaps[_SEQ_CMAP].with_extremes(bad="#d0d0d0")
    norm = Normalize(0.0, vmax)
    # Numbers in the cells only where a cell is big enough to hold them legibly (inches):
    # two decimals in wide cells, one in narrower ones, none in small ones (the colour bar remains).
    cell_w, cell_h = (panel_w - 0.8) / n_head, (panel_h - 0.9) / n_layer
    spec = ".2f" if cell_w >= 0.42 else ".1f" if cell_w >= 0.3 else None
    annotate = spec is not None and cell_h >= 0.2
    for ax, r in zip(axes.flat, results):
        e = np.ma.masked_invalid(r.head_entropy)
        ax.imshow(e, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(f"{_short(r.name, 40)}\nT={r.seq_len}, mean {r.mean_entropy:.2f} nats", fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer (0 = first)")
        ax.set_xticks(_ticks(r.n_head))
        yt = _ticks(r.n_layer, 18)
        ax.set_yticks(yt)
        d = r.diagnosis
        for lab, l in zip(ax.get_yticklabels(), yt):
            if d is not None and l in d.overloaded_layers:
                lab.set_color("#c0392b")
                lab.set_fontweight("bold")
            elif d is not None and l in d.collapsed_layers:
                lab.set_color("#1f5fbf")
                lab.set_fontweight("bold")
        ax.tick_params(labelsize=7)
        if annotate:
            for (l, h), v in np.ndenumerate(r.head_entropy):
                if np.isfinite(v):
                    ax.text(h, l, format(v, spec), ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 * vmax else "white")
    for ax in list(axes.flat)[len(results):]:
        ax.set_axis_off()
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9 if nrows <= 2 else 0.45,
                        aspect=25, pad=0.06)
    cbar.set_label("attention entropy (nats)")
    for r in {r.seq_len: r for r in results}.values():
        for y, label in ((r.e_max, f"log {r.seq_len}"), (r.causal_ceiling, f"uniform causal\nT={r.seq_len}")):
            if y <= vmax:
                cbar.ax.axhline(y, color="white", lw=1.2, ls="--" if y == r.e_max else ":")
                cbar.ax.text(-0.08, y / vmax, label, transform=cbar.ax.transAxes, fontsize=6,
                             va="center", ha="right", clip_on=False)
    fig.suptitle("Per-head attention entropy (Eq. 7), shared colour scale 0 to "
                 f"{vmax:.2f} nats; grey = not finite", fontsize=11)
    fig.supxlabel("Layer labels: red = entropic overload, blue = entropy collapse (criteria in the text output "
                  "/ --json).\nColour bar: dashed = log T; dotted = entropy of a uniform causal head "
                  "(the most a causal head can reach).", fontsize=7, color="#444")
    return _save(fig, out_dir, stem, formats)


def plot_band_fractions(
    results: Sequence[EntropyResult],
    out_dir: str | Path,
    *,
    stem: str = "entropy_bands",
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Fraction of heads in the four entropy bands, one bar group per run (paper Fig. 2a).

    Top panel: bands relative to each run's largest head entropy (the paper's convention).
    Bottom panel: the same bands relative to log T (an absolute scale shared by runs of equal T).
    """
    _require(results)
    n = len(results)
    fig = Figure(figsize=(min(12.0, max(6.5, 0.62 * n + 3.5)), 7.2), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    colors = [colormaps[_SEQ_CMAP](x) for x in (0.05, 0.35, 0.65, 0.95)]
    x = np.arange(n)
    w = 0.8 / 4
    for ax, key, title in (
        (axes[0], "bands_max", "relative to the largest head entropy of each run (max), as in paper Fig. 2a"),
        (axes[1], "bands_logt", "relative to log T (max replaced by log T)"),
    ):
        fr = np.array([getattr(r, key) for r in results], dtype=float) * 100
        for b in range(4):
            bars = ax.bar(x + (b - 1.5) * w, np.nan_to_num(fr[:, b]), w, color=colors[b],
                          edgecolor="black", linewidth=0.4, label=BAND_LABELS[b])
            if n <= 8:
                for rect, v in zip(bars, fr[:, b]):
                    if np.isfinite(v):
                        ax.text(rect.get_x() + rect.get_width() / 2, rect.get_height() + 1, f"{v:.0f}",
                                ha="center", va="bottom", fontsize=6)
        ax.set_ylim(0, 110)
        ax.set_ylabel("heads in band (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    # Beside the panels, not over the bars.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="entropy band\n(fraction of the\nreference)", fontsize=8, title_fontsize=8,
               loc="outside right upper")
    axes[1].set_xticks(x, [_short(r.name, 36) for r in results], rotation=35 if n > 3 else 0,
                       ha="right" if n > 3 else "center", rotation_mode="anchor", fontsize=8)
    axes[1].set_xlabel("run")
    fig.suptitle("Distribution of attention heads over entropy bands", fontsize=11)
    return _save(fig, out_dir, stem, formats)


def plot_layer_entropy(
    results: Sequence[EntropyResult],
    out_dir: str | Path,
    *,
    stem: str = "entropy_by_layer",
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Mean head entropy per layer, one line per run, with the min-max range over heads shaded."""
    _require(results)
    fig = Figure(figsize=(9.5 if len(results) > 1 else 7.0, 4.6), layout="constrained")
    ax = fig.subplots()
    for r, st in zip(results, run_styles(len(results))):
        layers = np.arange(r.n_layer)
        ax.plot(layers, r.layer_mean, ms=4, lw=1.3, label=_short(r.name, 48), **st)
        if len(results) <= 3:
            ax.fill_between(layers, r.layer_min, r.layer_max, color=st["color"], alpha=0.12, linewidth=0)
    for r in {r.seq_len: r for r in results}.values():
        ax.axhline(r.e_max, color="grey", ls="--", lw=1)
        ax.text(0, r.e_max, f" log T = {r.e_max:.2f} (T={r.seq_len})", va="bottom", fontsize=7, color="grey")
        ax.axhline(r.causal_ceiling, color="grey", ls=":", lw=1)
        ax.text(0, r.causal_ceiling, f" uniform causal head = {r.causal_ceiling:.2f}", va="bottom", fontsize=7,
                color="grey")
    ax.set_xlabel("layer (0 = first)")
    ax.set_ylabel("mean head entropy (nats)")
    ax.set_ylim(0, 1.1 * max(r.e_max for r in results))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax, "run")
    ax.set_title("Attention entropy by layer (line: mean over heads"
                 + ("; band: min to max over heads)" if len(results) <= 3 else ")"), fontsize=10)
    return _save(fig, out_dir, stem, formats)


def plot_entropy_dynamics(
    results: Sequence[EntropyResult],
    out_dir: str | Path,
    *,
    stem: str = "entropy_dynamics",
    formats: Sequence[str] = FORMATS,
    ncols: int = 3,
) -> list[Path]:
    """Mean head entropy of each layer against the training step, one subplot per run (paper Fig. 7).

    Read from the runs' metrics.jsonl (per-head entropy logged during training, on training batches).
    """
    runs = [r for r in results if r.history is not None and len(r.history.steps) > 0]
    if not runs:
        raise FigureUnavailable("no run has per-head entropy logged in metrics.jsonl")
    if len(runs) > 9 and ncols == 3:
        ncols = 4
    nrows, ncols = _grid(len(runs), ncols)
    fig = Figure(figsize=(3.1 * ncols + 1.3, 2.8 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    max_l = max(r.n_layer for r in runs)
    cmap = colormaps["plasma"]
    bounds = np.arange(max_l + 1) - 0.5
    norm = BoundaryNorm(bounds, cmap.N)
    top = 1.1 * max(max(r.e_max, float(np.nanmax(r.history.layer_mean, initial=0.0))) for r in runs)
    for ax, r in zip(axes.flat, runs):
        h = r.history
        for l in range(h.layer_mean.shape[1]):
            ax.plot(h.steps, h.layer_mean[:, l], color=cmap(norm(l)), lw=1.2,
                    marker="o" if len(h.steps) < 15 else None, ms=2.5)
        ax.axhline(r.e_max, color="grey", ls="--", lw=1)
        ax.text(h.steps[0], r.e_max, f"log T = {r.e_max:.2f}", va="bottom", fontsize=7, color="grey")
        ax.set_title(_short(r.name, 40), fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel("mean head entropy (nats)")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, top)
    for ax in list(axes.flat)[len(runs):]:
        ax.set_axis_off()
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9 if nrows <= 2 else 0.45,
                        aspect=25, pad=0.02, ticks=_ticks(max_l, 18))
    cbar.set_label("layer (0 = first)")
    fig.suptitle("Entropy dynamics during training: mean head entropy per layer (training batches)",
                 fontsize=11)
    return _save(fig, out_dir, stem, formats)


def plot_thresholds(
    results: Sequence[EntropyResult],
    out_dir: str | Path,
    *,
    stem: str = "thresholds",
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Learned threshold weights theta of the entropy regulariser (paper Fig. 5).

    Left: theta per layer and head (target entropy = theta x log T), shared colour scale.
    Right: per-layer mean of theta over heads (bars) and its variance (line, right axis).
    """
    runs = [r for r in results if r.thresholds is not None]
    if not runs:
        raise FigureUnavailable("no run has learned thresholds (the entropy regulariser is off in all)")
    allv = np.concatenate([r.thresholds.ravel() for r in runs])
    allv = allv[np.isfinite(allv)]
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    norm = Normalize(lo, hi)
    cmap = colormaps["cividis"]
    fig = Figure(figsize=(10.0, 3.3 * len(runs) + 0.8), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False, width_ratios=[1.0, 1.25])
    for (ax_h, ax_s), r in zip(axes, runs):
        th = r.thresholds
        ax_h.imshow(th, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax_h.set_title(f"{_short(r.name, 40)}: theta per head", fontsize=9)
        ax_h.set_xlabel("head")
        ax_h.set_ylabel("layer (0 = first)")
        ax_h.set_xticks(_ticks(th.shape[1]))
        ax_h.set_yticks(_ticks(th.shape[0], 18))
        ax_h.tick_params(labelsize=7)
        layers = np.arange(th.shape[0])
        mean, var = th.mean(axis=1), th.var(axis=1)
        ax_s.bar(layers, mean, color="#4c72b0", alpha=0.8, label="mean over heads")
        ax_s.set_xlabel("layer (0 = first)")
        ax_s.set_ylabel("mean theta (fraction of log T)")
        ax_s.xaxis.get_major_locator().set_params(integer=True)
        ax_s.grid(axis="y", alpha=0.3)
        ax2 = ax_s.twinx()
        ax2.plot(layers, var, color="#c44e52", marker="o", ms=3, label="variance over heads")
        ax2.set_ylabel("variance of theta", color="#c44e52")
        ax2.tick_params(axis="y", colors="#c44e52")
        ax2.set_ylim(bottom=0)
        ax_s.set_title(f"{_short(r.name, 40)}: per-layer mean and variance", fontsize=9)
        handles = ax_s.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax_s.legend(handles, [hd.get_label() for hd in handles], fontsize=7, loc="upper right")
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[:, 0].tolist(), shrink=0.9, pad=0.02)
    cbar.set_label("theta (target entropy = theta x log T)")
    fig.suptitle("Learned entropy-regularisation thresholds (reg_threshold_weights)", fontsize=11)
    return _save(fig, out_dir, stem, formats)


def plot_temperatures(
    results: Sequence[EntropyResult],
    out_dir: str | Path,
    *,
    stem: str = "temperatures",
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Learned softmax temperatures per layer: mean (line), +-1 std (error bars) and min-max
    (shaded) over heads and positions, one series per run with SM(t)."""
    runs = [r for r in results if r.temperature is not None]
    if not runs:
        raise FigureUnavailable("no run has learned softmax temperatures (attn_temperature is off in all)")
    fig = Figure(figsize=(10.0, 4.8), layout="constrained")
    ax = fig.subplots()
    lows = []
    for i, (r, st) in enumerate(zip(runs, run_styles(len(runs)))):
        t = {k: np.asarray(v, dtype=float) for k, v in r.temperature.items()}
        layers = np.arange(len(t["mean"])) + (i - (len(runs) - 1) / 2) * 0.08
        ax.fill_between(layers, t["min"], t["max"], color=st["color"], alpha=0.15, linewidth=0)
        ax.errorbar(layers, t["mean"], yerr=t["std"], color=st["color"], marker=st["marker"], ls=st["linestyle"],
                    ms=4, capsize=2, label=_short(r.name, 48))
        lows.append(t["min"])
    lo = np.concatenate(lows)
    hi = np.concatenate([np.asarray(r.temperature["max"], dtype=float) for r in runs])
    if np.all(lo > 0) and hi.max() / lo.min() > 20:
        ax.set_yscale("log")
    negative = nonpositive_temperature_runs(runs)
    if negative:
        # Only the 'raw' parametrisation can get here (the default t = exp(s) is positive): say
        # what a reader is looking at instead of leaving negative temperatures unexplained.
        ax.axhline(0.0, color="#c0392b", lw=1, ls="--")
        fig.supxlabel(f"Below the dashed line, t <= 0: in {', '.join(_short(n, 48) for n in negative)}. The 'raw' "
                      "temperature parametrisation (model.temperature_param=raw) lets t cross zero,\nwhere the "
                      "order of a row's attention weights is inverted; the default t = exp(s) stays positive.",
                      fontsize=8, color="#c0392b")
    ax.set_xlabel("layer (0 = first)")
    ax.set_ylabel("temperature t (logits divided by t * sqrt(d_k))")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax, "run: mean ± 1 std\n(shaded: min to max)")
    ax.set_title("Learned softmax temperatures per layer (over heads and query positions)", fontsize=10)
    return _save(fig, out_dir, stem, formats)


def nonpositive_temperature_runs(results: Sequence[EntropyResult]) -> list[str]:
    """Names of the runs with a learned temperature at or below zero somewhere (only the 'raw'
    parametrisation allows one)."""
    return [r.name for r in results if r.temperature is not None
            and np.any(np.asarray(r.temperature["min"], dtype=float) <= 0)]


def plot_loss_curves(
    curves: Sequence[LossCurve],
    out_dir: str | Path,
    *,
    stem: str = "loss_curves",
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Training loss (left) and validation loss (right) against training tokens, one line per run.

    The training loss is a moving mean over about 5% of the logged steps (raw per-batch values are
    too noisy to compare runs); a run that diverged ends with an x at its last finite loss.
    """
    curves = [c for c in curves if c is not None and (len(c.steps) or len(c.val_steps))]
    if not curves:
        raise FigureUnavailable("no run has losses logged in metrics.jsonl")
    by_tokens = all(c.tokens_per_step for c in curves)
    fig = Figure(figsize=(11.0, 4.6), layout="constrained")
    ax_t, ax_v = fig.subplots(1, 2, sharex=True)
    tops = []
    for c, st in zip(curves, run_styles(len(curves))):
        label = _short(c.name, 48) + (f" (diverged at step {c.diverged_at})" if c.diverged_at else "")
        x = c.tokens(c.steps) if by_tokens else c.steps
        ok = np.isfinite(c.loss)
        if ok.any():
            w = max(1, len(c.loss) // 20)
            smooth = np.convolve(np.where(ok, c.loss, 0.0), np.ones(w), "valid") / np.maximum(
                np.convolve(ok.astype(float), np.ones(w), "valid"), 1)
            xs = x[w - 1:]
            ax_t.plot(xs, smooth, color=st["color"], ls=st["linestyle"], lw=1.2, label=label,
                      marker=st["marker"], markevery=max(1, len(xs) // 6), ms=4)
            tops.append(smooth[min(len(smooth) - 1, len(smooth) // 10)])
            if c.diverged_at:
                ax_t.plot(xs[-1], smooth[-1], "x", color=st["color"], ms=9, mew=2)
        if len(c.val_steps):
            xv = c.tokens(c.val_steps) if by_tokens else c.val_steps
            ax_v.plot(xv, c.val_loss, color=st["color"], ls=st["linestyle"], marker=st["marker"], ms=4, lw=1.2,
                      label=None if ok.any() else label)
    if tops:  # the first 10% of training (the steep initial drop) may run off the top: the end is what differs
        lo = min(float(np.nanmin(ax.get_ylim()[0])) for ax in (ax_t, ax_v))
        ax_t.set_ylim(lo, max(tops) * 1.02)
    for ax, title in ((ax_t, "training loss (moving mean)"), (ax_v, "validation loss")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens" if by_tokens else "training step")
        ax.set_ylabel("cross-entropy (nats/token)" if ax is ax_v else "loss (nats/token)")
        ax.grid(alpha=0.3)
        if by_tokens:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.6M, not 1.6 x 1e6 in a corner
    handles = ax_t.get_legend_handles_labels()[0] + ax_v.get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside right upper", fontsize=7, title="run",
               title_fontsize=8)
    fig.suptitle("Loss during training", fontsize=11)
    return _save(fig, out_dir, stem, formats)


FIGURES: dict[str, Callable[..., list[Path]]] = {
    "heatmap": plot_head_entropy_heatmaps,
    "bands": plot_band_fractions,
    "layer_entropy": plot_layer_entropy,
    "dynamics": plot_entropy_dynamics,
    "thresholds": plot_thresholds,
    "temperatures": plot_temperatures,
    "loss": plot_loss_curves,
}
"""Figure name -> function, in the order make_all_figures draws them."""


def make_all_figures(
    results: Sequence[EntropyResult],
    out_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    only: Sequence[str] | None = None,
    curves: Sequence[LossCurve | None] | None = None,
) -> FigureSet:
    """Draw every figure the results support into `out_dir`; ``{name: png path}`` (first format's
    path when png is not among `formats`), with ``.skipped`` giving why a figure was left out and
    ``.all_paths`` every file written.

    results: `EntropyResult`s, already measured or loaded (`analysis.load_or_analyse` turns run
    directories into them; this module neither loads a model nor measures).
    curves: the runs' loss curves for the "loss" figure (`analysis.curves.read_loss_curves`);
    default none, and the figure is skipped.
    """
    results = list(results)
    bad = [x for x in results if not isinstance(x, EntropyResult)]
    if bad:
        raise ValueError(f"make_all_figures takes EntropyResults, not {type(bad[0]).__name__} ({bad[0]!r}); "
                         "load or analyse run directories first (analysis.load_or_analyse)")
    _require(results)
    curves = list(curves or [])
    names = list(FIGURES) if only is None else list(only)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; valid: {', '.join(FIGURES)}")
    out = FigureSet()
    for name in names:
        try:
            paths = FIGURES[name](curves if name == "loss" else results, out_dir, formats=formats)
        except FigureUnavailable as why:
            out.skipped[name] = str(why)
            continue
        out.all_paths[name] = paths
        out[name] = next((p for p in paths if p.suffix == ".png"), paths[0])
    return out
