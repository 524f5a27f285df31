"""The report: the paper's tables and figures with our numbers beside theirs.

Reads only files that the pipeline's stages wrote into RUN_ROOT (see `piformer.reproduce`), so
every number in the report can be traced to the run file it came from, and writes
`report.md` (figures linked) and `report.html` (one self-contained file, figures embedded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import paper
from . import run_dir as rd
from .fileio import atomic_write_text
from .entropy import BAND_LABELS
from .report_doc import Document, Figure, Heading, Para, Table
from .report_doc import fmt as _fmt

# Operator classes of piformer.pi.jax_forward.OP_CLASSES, in the order the report shows them
# ("input": sharing the private inputs).
PI_CLASSES = ("softmax", "layernorm", "activation", "matmul", "embedding", "head", "other", "input")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:+.2f}%"


def collect(run_root: str | Path) -> dict[str, Any]:
    """Everything the report shows, read from RUN_ROOT; also saved as RUN_ROOT/results.json."""
    root = Path(run_root)
    manifest = _read(root / "reproduce.json") or {}
    runs = []
    specs = manifest.get("run_specs", {})
    for label, rel in manifest.get("runs", {}).items():
        d = root / rel
        spec = specs.get(label, {})
        runs.append({
            "label": label,
            "preset": spec.get("preset", label),
            "seed": spec.get("seed") if spec.get("seed") is not None else (_read(d / rd.CONFIG) or {}).get("train", {}).get("seed"),
            "variant": spec.get("variant", ""),
            "dir": rel,
            "regulariser": _regulariser_summary(d / rd.METRICS),
            "status": _read(d / rd.STATUS) or {},
            "eval": _read(d / rd.EVAL),
            "entropy": _read(d / rd.ENTROPY),
            "pi_cost": _read(d / rd.PI_COST),
            "pi_cost_paper_shape": _read(d / rd.PI_COST_GPT2),
            "pi_secure": _read(d / rd.PI_SECURE),
            "pi_estimate": _read(d / rd.PI_ESTIMATE),
        })
    data_dir = Path(manifest["data_dir"]) if manifest.get("data_dir") else root / "data"
    if not data_dir.is_absolute():
        data_dir = root / data_dir
    return {"manifest": manifest, "runs": runs, "data": _read(data_dir / "meta.json") or {}}


def _regulariser_summary(metrics: Path) -> dict[str, Any] | None:
    """The last logged regulariser and temperature telemetry of a run (None if it logged none)."""
    if not metrics.is_file():
        return None
    last: dict[str, Any] = {}
    ratios = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("reg_grad_ratio") is not None:
            ratios.append((rec["step"], rec["reg_grad_ratio"]))
        if "temperature" in rec or "reg_outside" in rec:
            last = rec
    if not last:
        return None
    keys = ("step", "reg", "reg_weighted", "reg_share", "reg_outside", "threshold_stats", "temperature")
    return {**{k: last.get(k) for k in keys}, "reg_grad_ratio": ratios}


def _ppl_section(doc: Document, runs: list[dict]) -> None:
    base = next((r for r in runs if r["preset"] == "SM+LN+G" and r["eval"]), None)
    base_ppl = base["eval"]["ppl"] if base else None
    rows = []
    for r in runs:
        status = r["status"].get("status", "missing")
        ours = r["eval"]["ppl"] if r["eval"] and status != "diverged" else None
        delta = (ours / base_ppl - 1) if (ours is not None and base_ppl) else None
        outcome = (
            f"diverged at step {r['status'].get('step')}" if status == "diverged"
            else f"{status}, {r['status'].get('step', '?')} steps"
        )
        ppr = paper.PPL_T128.get(r["preset"])
        rows.append([
            f"`{r['label']}`",
            "NaN (diverges)" if r["preset"] == "SM" else _fmt(ppr, ".2f"),
            _pct(paper.ppl_delta(r["preset"])),
            _fmt(ours, ".3f", none="NaN" if status == "diverged" else "—"),
            _pct(delta),
            outcome,
            f"`{r['dir']}/eval.json`",
        ])
    doc.add(
        Heading("Perplexity (paper Figure 2b, Tables 2, 4, 5)"),
        Table(
            ["config", "paper PPL", "paper Δ vs SM+LN+G", "ours PPL", "ours Δ", "our run", "source"],
            rows,
            caption="Paper: GPT-2 small, CodeParrot, T=128, ~2.1B tokens. Ours: this tier's size, data and steps.",
        ),
    )
    sc = next((r for r in runs if r["preset"] == "SM+ScFuFFN" and r["eval"]), None)
    er = next((r for r in runs if r["preset"] == "EReg(SM(t)+ScFuFFN)" and r["eval"]), None)
    if sc and er:
        gain = 1 - er["eval"]["ppl"] / sc["eval"]["ppl"]
        doc.add(Para(
            f"Entropy regularisation: `EReg(SM(t)+ScFuFFN)` is {gain * 100:.1f}% "
            f"{'better' if gain >= 0 else 'worse'} than `SM+ScFuFFN` in our runs "
            f"(paper: {paper.EREG_IMPROVEMENT * 100:.1f}% better)."
        ))


def _loss_section(doc: Document, figures: dict[str, str], root: Path) -> None:
    path = figures.get("loss")
    if path and (root / path).is_file():
        doc.add(Heading("Training"), Figure(root / path, FIGURE_CAPTIONS["loss"]))


def _entropy_section(doc: Document, runs: list[dict], figures: dict[str, str], root: Path) -> None:
    doc.add(Heading("Attention entropy (paper Figures 2, 4, 5, 7)"))
    rows = []
    for r in runs:
        e = r["entropy"]
        if not e:
            continue
        bands = e.get("bands_max") or [None] * 4
        diag = e.get("diagnosis") or {}
        paper_top = paper.BANDS_TOP.get(r["preset"])
        paper_bottom = paper.BANDS_BOTTOM.get(r["preset"])
        rows.append(
            [f"`{r['label']}`"]
            + [_fmt(b * 100 if b is not None else None, ".1f") + "%" for b in bands]
            + [
                "—" if paper_top is None else f"{paper_top * 100:.0f}%",
                "—" if paper_bottom is None else f"{paper_bottom * 100:.0f}%",
                ", ".join(map(str, diag.get("overloaded_layers", []))) or "none",
                ", ".join(map(str, diag.get("collapsed_layers", []))) or "none",
                f"`{r['dir']}/entropy.json`",
            ]
        )
    if rows:
        crit = next((r["entropy"].get("diagnosis", {}).get("criteria") for r in runs if r["entropy"]), "")
        doc.add(
            Table(
                ["config", *[f"ours {b}" for b in BAND_LABELS], "paper top band", "paper bottom band",
                 "overloaded layers", "collapsed layers", "source"],
                rows,
                caption="Fraction of heads per band, relative to the largest head entropy of the model (Figure 2a).",
            ),
            Para(f"Diagnosis criteria: {crit}"),
        )
    for key in [k for k in [*FIGURE_CAPTIONS, *sorted(set(figures) - set(FIGURE_CAPTIONS))] if k != "loss"]:
        path = figures.get(key)
        if path and (root / path).is_file():
            caption = FIGURE_CAPTIONS.get(key, key.replace("_", " ").capitalize() + ".")
            if key == "temperatures":
                caption += _nonpositive_note(runs)
            doc.add(Figure(root / path, caption))


FIGURE_CAPTIONS = {
    "loss": "Training loss (moving mean) and validation loss against training tokens, one line per run: "
            "where curves still fall at the end, longer training could reorder the configurations.",
    "heatmap": "Per-head attention entropy, layers x heads, one panel per run on one colour scale "
               "(Figures 2, 4): bright early layers are entropic overload, dark deep layers entropy "
               "collapse; the diagnosis colours the layer labels red and blue.",
    "bands": "Share of heads in each entropy band, one bar group per run (Figure 2a): compare the top "
             "band's share between configurations with and without LayerNorm.",
    "layer_entropy": "Mean head entropy per layer, one line per run: a line near the dotted ceiling means "
                     "that layer's heads attend almost uniformly over the context.",
    "dynamics": "Mean attention entropy of each layer over training (Figure 7): whether a layer's entropy "
                "settles early or keeps drifting.",
    "thresholds": "The regulariser's learned thresholds per layer and head (Figure 5): a spread within a "
                  "layer means its heads learned different entropy targets.",
    "temperatures": "Learned softmax temperatures per layer, mean and spread over heads and positions: "
                    "how far each layer moved from its initial temperature.",
}
"""Figure name (`piformer.analysis.figures.FIGURES`) -> its caption: what it shows and what to look for."""


def _nonpositive_note(runs: list[dict]) -> str:
    """A sentence naming the runs whose learned temperatures reached zero or below, if any."""
    hit = []
    for r in runs:
        t = (r.get("regulariser") or {}).get("temperature") or {}
        share = t.get("frac_nonpos") or []
        if share and max(share) > 0:
            hit.append(f"`{r['label']}` ({sum(share) / len(share) * 100:.1f}% of its temperatures)")
    if not hit:
        return ""
    return (" Temperatures at or below zero, in " + ", ".join(hit) + ", come from the 'raw' parametrisation "
            "(`model.temperature_param=raw`), which lets t cross zero and so invert a row's attention ranking; "
            "the default t = exp(s) stays positive.")


def _pi_section(doc: Document, runs: list[dict], notes: list[str] = ()) -> None:
    t2 = paper.PAPER_TABLES["2"]["rows"]
    rows = []
    for r in runs:
        c = r["pi_cost_paper_shape"]
        if not c:
            continue
        p = t2.get(r["preset"], {})
        rows.append([
            f"`{r['label']}`",
            ", ".join(op["paper"] for op in c["nonlinear"]) or "—",
            c["ffn_flops_paper"], p.get("ffn", "—"),
            c["attn_flops_paper"], p.get("attn", "—"),
            _fmt(p.get("comm_gb"), ".2f"), _fmt(p.get("lat_min"), ".2f"),
        ])
    doc.add(
        Heading("Private-inference cost (paper Table 2)"),
        Table(
            ["config", "nonlinear ops (ours)", "FFN FLOPs ours", "paper", "Attn FLOPs ours", "paper",
             "paper comm GB", "paper latency min"],
            rows,
            caption="Analytic counts at the paper's shape (GPT-2 small, T=128), from `piformer pi-cost`.",
        ),
    )
    _add_estimates(doc, runs)
    measured = [r for r in runs if r["pi_secure"]]
    if not measured:
        skipped = [n for n in notes if n.startswith("secure inference skipped")]
        doc.add(Para(skipped[0][0].upper() + skipped[0][1:] + "." if skipped else "No secure (SPU) run in this tier."))
        return
    first = measured[0]["pi_secure"]
    st, acc = first.get("settings", {}), first.get("accuracy", {})
    lan, wan = first["latency"]["LAN"], first["latency"]["WAN"]
    doc.add(
        Heading("Secure two-party inference, measured (SPU)", 3),
        Para(
            f"Each configuration's trained checkpoint run under SPU on a {first['seq_len']}-token prompt from "
            f"the validation split: the server's weights and the client's token ids are the two parties' "
            f"private inputs. Protocol {st.get('protocol', '?')}, {acc.get('fixed_point', '')}. Bytes and messages "
            f"come from SPU's own per-operation profile. Latency = measured compute + bytes x 8 / bandwidth "
            f"+ messages x RTT / 2, with LAN = {lan['bandwidth_bps'] / 1e9:g} Gbit/s, {lan['rtt_s'] * 1e3:g} ms and "
            f"WAN = {wan['bandwidth_bps'] / 1e6:g} Mbit/s, {wan['rtt_s'] * 1e3:g} ms (the paper's)."
        ),
    )
    rows = []
    base = next((r["pi_secure"] for r in measured if r["preset"] == "SM+LN+G"), None)
    for r in measured:
        s = r["pi_secure"]
        by = s.get("per_class", {})
        rows.append(
            [f"`{r['label']}`"]
            + [_fmt(by.get(k, {}).get("bytes", 0) / 2**20, ".2f") for k in PI_CLASSES]
            + [
                _fmt(s["total_bytes"] / 2**20, ".2f"),
                f"{s['total_messages']}",
                "—" if not base else f"{base['total_bytes'] / s['total_bytes']:.2f}x",
                _fmt(s["latency"]["LAN"]["total_s"], ".2f"), _fmt(s["latency"]["WAN"]["total_s"], ".2f"),
                _fmt(s["accuracy"].get("max_abs_logit_error"), ".2e"),
                _fmt(s["accuracy"].get("argmax_agreement"), ".3f"),
                f"`{r['dir']}/pi_secure.json`",
            ]
        )
    doc.add(Table(
        ["config", *[f"{k} MiB" for k in PI_CLASSES], "total MiB", "messages", "comm saving vs SM+LN+G",
         "LAN s", "WAN s", "max abs logit err", "argmax agree", "source"],
        rows,
        caption="Communication per operator class (both directions) and projected latency.",
    ))
    wan_rows = [
        [f"`{r['label']}`"] + [_fmt(r["pi_secure"]["latency"]["WAN"][k], ".2f")
                                for k in ("compute_s", "transfer_s", "waiting_s", "total_s")]
        for r in measured
    ]
    doc.add(Table(["config", "compute s", "transfer s", "waiting s", "WAN total s"], wan_rows,
                  caption="The WAN latency's terms."))
    doc.add(Para(
        f"Paper savings at GPT-2 small T=128: {paper.SAVINGS_T128['SM+LN+R']['comm']}x comm / "
        f"{paper.SAVINGS_T128['SM+LN+R']['latency']}x latency (ReLU), {paper.SAVINGS_T128['SM+ScFuFFN']['comm']}x / "
        f"{paper.SAVINGS_T128['SM+ScFuFFN']['latency']}x (SM+ScFuFFN). The GPT-2-scale measurement is "
        "`benchmarks/bench_pi_gpt2.py` (see docs/private_inference.md)."
    ))


def _add_estimates(doc, runs: list[dict]) -> None:
    """Every configuration priced by the fitted estimator; a measured SPU run beside its estimate."""
    priced = [r for r in runs if r.get("pi_estimate")]
    if not priced:
        return
    rows = []
    for r in priced:
        e, s = r["pi_estimate"], r["pi_secure"]
        own = e["run_shape"]
        measured = (f"{s['total_bytes'] / 2**20:.2f} MiB measured (T={s['seq_len']})" if s else "not measured")
        rows.append([f"`{r['label']}`"]
                    + [_fmt(e["paper_shape"][k]["total_bytes"] / 1e9, ".2f") for k in ("default", "optimised")]
                    + [_fmt(e["paper_shape"][k]["latency"]["WAN"]["total_s"] / 60, ".1f") for k in ("default", "optimised")]
                    + [f"{own['total_bytes'] / 2**20:.2f} MiB estimated (T={own['seq_len']})", measured])
    v = priced[0]["pi_estimate"]["paper_shape"]["optimised"].get("validation") or {}
    accuracy = (f"on {v['held_out_runs']} held-out models its total bytes were off by up to "
                f"{v['max_abs_bytes_error']:.0%}" if v else "not validated")
    doc.add(Heading("Secure cost predicted without SPU", 3))
    doc.add(Table(
        ["config", "est. GB default", "est. GB optimised", "est. WAN min default", "est. WAN min optimised",
         "this run's shape", "SPU run"],
        rows,
        caption="Secure cost of every configuration predicted without SPU (`piformer pi-cost --secure`; fitted to "
                f"SPU 0.9.5's counters, {accuracy}) at GPT-2 small, T=128, beside a measured SPU run where the "
                "tier has one. Estimated WAN latency uses the fitting machine's compute and messages for waits.",
    ))


def group_by_config(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs pooled by (preset, variant): the seeds of one configuration."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        out.setdefault((r["preset"], r.get("variant", "")), []).append(r)
    return out


def finished_ppl(runs: list[dict]) -> list[float]:
    """Perplexities of the runs that finished and were evaluated (diverged runs have none)."""
    return [r["eval"]["ppl"] for r in runs
            if r.get("eval") and (r.get("status") or {}).get("status") != "diverged" and r["eval"].get("ppl") is not None]


def mean_range(xs: list[float], spec: str) -> str:
    """'mean (min–max)' over the finite values; one value alone; '—' for none."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "—"
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{sum(xs) / len(xs):{spec}} ({min(xs):{spec}}–{max(xs):{spec}})"


def _seeds_section(doc: Document, runs: list[dict]) -> None:
    """Mean and spread over seeds for every configuration trained with more than one."""
    from .findings import entropy_view

    rows = []
    for (preset, variant), group in group_by_config(runs).items():
        if len(group) < 2:
            continue
        ppl = finished_ppl(group)
        views = [v for v in (entropy_view(r) for r in group) if v is not None]
        rows.append([f"`{preset}{' ' + variant if variant else ''}`", ", ".join(str(r["seed"]) for r in group),
                     mean_range(ppl, ".2f"), f"{max(ppl) - min(ppl):.2f}" if len(ppl) > 1 else "—",
                     mean_range([v.early_mean for v in views], ".3f"),
                     mean_range([v.deep_mean for v in views], ".3f")])
    if rows:
        doc.add(
            Heading("Seed spread"),
            Table(["config", "seeds", "PPL mean (min–max)", "PPL spread", "first-half mean head entropy",
                   "last-half mean head entropy"], rows,
                  caption="A difference between two configurations smaller than their seed spread is noise."),
        )


def _regulariser_section(doc: Document, runs: list[dict]) -> None:
    """Is the regulariser doing anything, and how do the temperature parametrisations compare."""
    rows = []
    for r in runs:
        g = r.get("regulariser")
        if not g:
            continue
        th = g.get("threshold_stats") or {}
        t = g.get("temperature") or {}
        ratios = g.get("reg_grad_ratio") or []
        std = th.get("std") or []
        rows.append([
            f"`{r['label']}`",
            _fmt(g.get("reg"), ".1f"), _fmt(g.get("reg_share"), ".2e"),
            "—" if g.get("reg_outside") is None else f"{g['reg_outside'] * 100:.1f}%",
            "—" if not ratios else f"{ratios[0][1]:.1e} → {ratios[-1][1]:.1e}",
            "—" if not std else f"{sum(std) / len(std):.3f}",
            "—" if not t else f"{min(t['min']):.3g} / {sum(t['mean']) / len(t['mean']):.3g} / {max(t['max']):.3g}",
            "—" if not t.get("frac_nonpos") else f"{sum(t['frac_nonpos']) / len(t['frac_nonpos']) * 100:.1f}%",
        ])
    if not rows:
        return
    doc.add(
        Heading("The regulariser at work"),
        Para(
            "From each run's `metrics.jsonl`, at its last logged step: the unweighted penalty, "
            "lambda x penalty as a share of the total loss, the share of query rows outside the "
            "tolerance band (where the penalty's gradient lives; 0 means it does nothing), the ratio of the "
            "regulariser's gradient norm to the cross-entropy's on the query/key projections and temperatures "
            "(first → last measurement), the mean within-layer std of the learned thresholds, and the learned "
            "temperatures (min / mean / max over layers, heads and positions) with the share at or below zero."
        ),
        Table(["run", "penalty", "lambda x penalty / loss", "rows outside band", "grad ratio reg/CE",
               "threshold std", "t min / mean / max", "t <= 0"], rows),
    )
    temp = temperature_comparison(runs)
    if temp:
        doc.add(Para(f"Temperature parametrisation, `EReg(SM(t)+ScFuFFN)`: {temp['statement']}"))


def temperature_comparison(runs: list[dict]) -> dict[str, Any] | None:
    """EReg with the positive temperature t = exp(s) (its default seeds) against the raw-t variant.

    The rule, fixed before the study ran: raw is better only if its mean PPL is lower than the
    positive form's by more than the positive form's seed spread; the positive form is kept
    otherwise (within noise it wins on soundness: it cannot invert a row's attention ranking).
    """
    groups = group_by_config(runs)

    def nonpos(group: list[dict]) -> list[float]:
        out = []
        for r in group:
            t = (r.get("regulariser") or {}).get("temperature") or {}
            if t.get("frac_nonpos"):
                out.append(sum(t["frac_nonpos"]) / len(t["frac_nonpos"]))
        return out

    exp_runs, raw_runs = groups.get(("EReg(SM(t)+ScFuFFN)", ""), []), groups.get(("EReg(SM(t)+ScFuFFN)", "t=raw"), [])
    exp_ppl, raw_ppl = finished_ppl(exp_runs), finished_ppl(raw_runs)
    if not exp_ppl or not raw_ppl:
        return None
    spread = max(exp_ppl) - min(exp_ppl) if len(exp_ppl) > 1 else 0.0
    diff = sum(raw_ppl) / len(raw_ppl) - sum(exp_ppl) / len(exp_ppl)
    if diff < -spread:
        better, verdict = "raw", "the raw temperature is better beyond the seed spread"
    elif diff > spread:
        better, verdict = "exp", "the positive temperature is better beyond the seed spread"
    else:
        better, verdict = "exp", ("the two are within seed noise, so the positive form stays the default: it cannot "
                                  "invert a row's attention ranking")
    raw_np = nonpos(raw_runs)
    statement = (
        f"positive t = exp(s) (default) PPL {', '.join(f'{x:.2f}' for x in exp_ppl)}; raw t PPL "
        f"{', '.join(f'{x:.2f}' for x in raw_ppl)} (difference {diff:+.2f}, seed spread {spread:.2f}); "
        + (f"{raw_np[0] * 100:.1f}% of the raw run's temperatures ended at or below zero; " if raw_np else "")
        + f"{verdict}."
    )
    return {"exp_ppl": exp_ppl, "raw_ppl": raw_ppl, "diff": diff, "spread": spread, "better": better,
            "raw_frac_nonpos": raw_np, "statement": statement}


def _what_was_run(doc: Document, res: dict[str, Any], root_name: str = "RUN_ROOT") -> None:
    from .config import ModelConfig, TrainConfig, field_docs

    m, data = res["manifest"], res["data"]
    tier = m.get("tier", {})
    splits = data.get("splits", {})
    docs = {"model": field_docs(ModelConfig), "train": field_docs(TrainConfig)}
    settings = [
        [f"`{section}.{k}`", str(v), docs[section].get(k, "")]
        for section in ("model", "train") for k, v in (tier.get(section) or {}).items()
    ]
    doc.add(
        Heading("What was run"),
        Table(["item", "value"], [
            ["command", f"`piformer reproduce --tier {tier.get('name', '?')} --out {root_name}`"],
            ["tier", f"`{tier.get('name', '?')}`: {tier.get('note', '')}"],
            ["model size", f"`{tier.get('size')}` (`piformer presets` lists it), with the settings below"],
            ["data", f"{data.get('source', '?')} — train {splits.get('train', {}).get('tokens', '?')} tokens, "
                     f"val {splits.get('val', {}).get('tokens', '?')} tokens, vocabulary {data.get('vocab_size', '?')}, "
                     f"{len(data.get('manifest', data.get('files', [])) or [])} files (manifest: `data/meta.json`)"],
            ["versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())],
            ["machine", m.get("machine", "?")],
            ["started", m.get("started", "?")],
            ["wall time", f"{m.get('wall_s', 0) / 60:.1f} min"],
            *([["notes", "; ".join(m["notes"])]] if m.get("notes") else []),
        ]),
    )
    if settings:
        doc.add(Table(["setting", "value", "meaning"], settings,
                      caption="The tier's settings, on top of the size preset's and shared by every run "
                              "(`piformer presets --fields` lists every field)."))


def draw_figures(run_root: str | Path) -> dict[str, str]:
    """Redraw RUN_ROOT/figures from the runs' saved files (entropy.json, metrics.jsonl; no model is
    loaded); ``{name: png path relative to RUN_ROOT}``."""
    from .analysis.curves import read_loss_curves
    from .analysis.figures import make_all_figures
    from .analysis.runs import load_or_analyse

    root = Path(run_root)
    manifest = _read(root / "reproduce.json") or {}
    runs = [root / rel for rel in manifest.get("runs", {}).values() if (root / rel / rd.ENTROPY).is_file()]
    if not runs:
        return {}
    results = load_or_analyse(runs)  # each run has its entropy.json: read, not measured
    paths = make_all_figures(results, root / "figures", curves=read_loss_curves(runs, results))
    return {k: str(Path(v).resolve().relative_to(root.resolve())) for k, v in paths.items()}


def build(run_root: str | Path, figures: dict[str, str] | None = None) -> dict[str, Path]:
    """Write RUN_ROOT/report.md, report.html and results.json; return their paths.

    figures: ``{name: path relative to RUN_ROOT}`` to show; default: those reproduce.json lists.
    """
    root = Path(run_root)
    res = collect(root)
    m = res["manifest"]
    figures = m.get("figures", {}) if figures is None else figures
    res["figures"] = figures
    tier = m.get("tier", {})
    doc = Document(f"piformer report — tier `{tier.get('name', '?')}`")
    doc.add(Para(
        "Reproduction of *Entropy-Guided Attention for Private LLMs* (Jha & Reagen, 2025): the paper's "
        "numbers beside ours. Each of our numbers names the run file it was read from."
    ))
    if tier.get("smoke"):
        doc.add(Para(
            "**Smoke view.** This tier trains tiny models for a few hundred steps: it checks the pipeline "
            "end to end, and its perplexities and entropy patterns are not comparable with the paper's."
        ))
    from .findings import evaluate_findings, findings_blocks

    findings = evaluate_findings(res)
    res["findings"] = [f.to_dict() for f in findings]
    res["temperature_comparison"] = temperature_comparison(res["runs"])
    doc.add(*findings_blocks(findings))
    _what_was_run(doc, res, str(run_root))
    _ppl_section(doc, res["runs"])
    _seeds_section(doc, res["runs"])
    _regulariser_section(doc, res["runs"])
    _loss_section(doc, figures, root)
    _entropy_section(doc, res["runs"], figures, root)
    _pi_section(doc, res["runs"], m.get("notes", []))
    paths = {"md": root / "report.md", "html": root / "report.html", "results": root / "results.json"}
    atomic_write_text(paths["md"], doc.to_markdown(root))
    atomic_write_text(paths["html"], doc.to_html())
    atomic_write_text(paths["results"], json.dumps(res, indent=1, default=str))
    return paths
