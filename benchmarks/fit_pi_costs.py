"""Fit (and validate) the secure-cost estimator behind `piformer pi-cost --secure`.

1. measure: run small models under SPU (`run_secure`, both parties in this process) at varied
   widths, heads, lengths and vocabulary chunkings, for each SPU settings preset, and keep every
   step's bytes, messages and seconds with its shape features
   (results/pi/spu_cost_measurements.json, appended as each run ends: a rerun resumes);
2. fit: for every step kind, non-negative least squares of each quantity on the kind's features
   (`piformer.pi.estimate.FEATURES`); the one-time setup and the reveal's bytes per logit too;
   written to src/piformer/pi/spu_costs.json, keyed by SPU version, protocol and settings;
3. validate: models NOT used in the fit (other depths, widths, lengths, and presets that are not
   in the fit) measured end to end under SPU against the prediction
   (results/pi/estimator_validation.json and the table printed at the end).

    nohup python benchmarks/fit_pi_costs.py > out/fit_pi_costs.log 2>&1 &     # all three, ~1 h on 2 cores
    python benchmarks/fit_pi_costs.py --fit-only                              # refit from saved measurements
    python benchmarks/fit_pi_costs.py --report-only                           # the validation table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from piformer.fileio import atomic_write_text
from piformer.pi.spu_backend import SETTINGS_PRESETS

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "results/pi/spu_cost_measurements.json"
VALIDATION = ROOT / "results/pi/estimator_validation.json"
HELD_OUT_MEASURED = ROOT / "results/pi/estimator_holdout_measurements.json"
COSTS = ROOT / "src/piformer/pi/spu_costs.json"
SETTINGS = tuple(SETTINGS_PRESETS)  # every preset gets its own fitted constants

# (preset, n_layer, n_embd, n_head, T, vocab, chunk): the fit uses one block per run; the three
# presets between them contain every step kind (GELU, ReLU, temperature, fused FFN, beta, LN).
FIT = [
    ("SM+LN+G", 1, 32, 2, 8, 97, 40),
    ("SM+LN+R", 1, 64, 4, 16, 300, 128),
    ("SM(t)+ScFuFFN", 1, 128, 4, 32, 500, 256),
    ("SM+LN+G", 1, 64, 2, 32, 200, 64),
    ("SM+LN+R", 1, 128, 8, 16, 300, 128),
    ("SM(t)+ScFuFFN", 1, 32, 4, 64, 150, 64),
    ("SM+LN+G", 1, 96, 4, 24, 400, 160),
    ("SM+LN+R", 1, 128, 2, 64, 256, 256),
    ("SM(t)+ScFuFFN", 1, 64, 8, 48, 350, 100),
]
# Held out: other depths, widths (up to 2x the fit's), lengths (up to 2x), and three presets
# that are not in the fit at all.
HELD_OUT = [
    ("SM+ScFuFFN", 2, 160, 4, 40, 600, 256),
    ("SM+ScFFN", 2, 192, 6, 56, 512, 200),
    ("SM+G", 3, 96, 4, 80, 300, 128),
    ("SM+LN+G", 2, 144, 6, 96, 400, 150),
    ("SM(t)+ScFuFFN", 2, 256, 8, 32, 700, 300),
    ("SM+LN+R", 3, 64, 2, 128, 256, 128),
]


def _model(case):
    import torch

    from piformer.config import ModelConfig
    from piformer.model import PiGPT
    from piformer.pi.jax_forward import state_dict_to_numpy

    preset, L, d, H, T, V, _ = case
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, size="tiny", n_layer=L, n_embd=d, n_head=H, block_size=T, vocab_size=V)
    return cfg, state_dict_to_numpy(PiGPT(cfg).eval())


def _measure(case, settings_name: str):
    from piformer.pi import jax_forward as jf
    from piformer.pi.estimate import step_features, step_kind
    from piformer.pi.secure import run_secure
    from piformer.pi.spu_backend import SPUSettings

    cfg, sd = _model(case)
    T, chunk = case[4], case[6]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, T)
    settings = SPUSettings.preset(settings_name)
    t0 = time.perf_counter()
    r = run_secure(sd, cfg, ids, settings, vocab_chunk=chunk)
    program = jf.build_program(cfg, T, vocab_chunk=chunk, exp_clip=settings.exp_clip)
    steps = []
    for step, got in zip(program.steps, r.steps):
        assert step.name == got["name"]
        kind = step_kind(step.key)
        if kind is not None:
            steps.append({"name": step.name, "kind": kind, "features": step_features(step, program, cfg),
                          "bytes": got["bytes"], "messages": got["messages"], "seconds": got["seconds"]})
    return {"case": list(case), "settings": settings_name, "settings_dict": settings.to_dict(), "steps": steps,
            "total_bytes": r.total_bytes, "total_messages": r.total_messages, "compute_s": r.wall_s,
            "setup": r.setup, "reveal_bytes": r.reveal_bytes, "logits": T * cfg.vocab_size,
            "max_abs_logit_error": r.accuracy["max_abs_logit_error"], "elapsed_s": time.perf_counter() - t0}


def measure_all(cases, path: Path) -> list:
    runs = json.loads(path.read_text()) if path.exists() else []
    for settings_name in SETTINGS:
        for case in cases:
            if any(r["case"] == list(case) and r["settings"] == settings_name for r in runs):
                continue
            runs.append(_measure(case, settings_name))
            atomic_write_text(path, json.dumps(runs, indent=1))
            r = runs[-1]
            print(f"{settings_name:9s} {case}: {r['total_bytes'] / 1e6:.2f} MB, {r['total_messages']} messages, "
                  f"{r['elapsed_s']:.0f} s", flush=True)
    return runs


def fit(runs: list) -> dict:
    from scipy.optimize import nnls

    from piformer.pi.estimate import FEATURES, QUANTITIES, SPU_VERSION, cost_key

    fits = {}
    for settings_name in SETTINGS:
        mine = [r for r in runs if r["settings"] == settings_name]
        if not mine:
            continue
        key = cost_key(mine[0]["settings_dict"])
        kinds = {}
        for kind, names in FEATURES.items():
            rows = [s for r in mine for s in r["steps"] if s["kind"] == kind]
            if not rows:
                continue
            X = np.array([[s["features"][n] for n in names] for s in rows])
            scale = X.max(axis=0)  # columns of very different magnitudes: solve on a scaled copy
            kinds[kind] = {}
            for q in QUANTITIES:
                y = np.array([s[q] for s in rows], dtype=float)
                coef, _ = nnls(X / scale, y)
                kinds[kind][q] = {n: float(c / s) for n, c, s in zip(names, coef, scale)}
            kinds[kind]["samples"] = len(rows)
        setups = [r["setup"] for r in mine]
        fits[key] = {
            "settings": settings_name, "kinds": kinds,
            "setup": {q: float(np.mean([s[q] for s in setups])) for q in ("bytes", "messages", "seconds")},
            "reveal_bytes_per_logit": float(np.mean([r["reveal_bytes"] / r["logits"] for r in mine])),
            "fitted_on": [r["case"] for r in mine],
        }
    return {"spu_version": SPU_VERSION, "refit_with": "python benchmarks/fit_pi_costs.py --fit-only",
            "fits": fits}


def validate(runs: list, costs: dict) -> list[dict]:
    from piformer.pi.estimate import estimate
    from piformer.pi.spu_backend import SPUSettings

    rows = []
    for r in runs:
        cfg, _ = _model(r["case"])
        est = estimate(cfg, r["case"][4], SPUSettings.preset(r["settings"]), vocab_chunk=r["case"][6], costs=costs)
        rows.append({"case": r["case"], "settings": r["settings"],
                     "measured_bytes": r["total_bytes"], "predicted_bytes": est.total("bytes"),
                     "measured_messages": r["total_messages"], "predicted_messages": est.total("messages"),
                     "measured_s": r["compute_s"], "predicted_s": est.total("seconds")})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| settings | preset | L | d | H | T | V / chunk | measured MB | predicted MB | error | "
           "measured messages | predicted messages |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for v in rows:
        preset, L, d, H, T, V, chunk = v["case"]
        err = v["predicted_bytes"] / v["measured_bytes"] - 1
        out.append(f"| {v['settings']} | {preset} | {L} | {d} | {H} | {T} | {V} / {chunk} | "
                   f"{v['measured_bytes'] / 1e6:.2f} | {v['predicted_bytes'] / 1e6:.2f} | {err:+.1%} | "
                   f"{v['measured_messages']:,} | {v['predicted_messages']:,.0f} |")
    worst = max(abs(v["predicted_bytes"] / v["measured_bytes"] - 1) for v in rows)
    out.append(f"\nlargest |error| in total bytes: {worst:.1%} over {len(rows)} held-out runs (target <= 5%)")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit-only", action="store_true", help="refit and validate from saved measurements")
    p.add_argument("--report-only", action="store_true", help="print the saved validation table")
    args = p.parse_args()
    if args.report_only:
        print(table(json.loads(VALIDATION.read_text())))
        return 0
    runs = json.loads(MEASURED.read_text()) if args.fit_only else measure_all(FIT, MEASURED)
    costs = fit(runs)
    # written now, so an interrupted validation (minutes of SPU runs) keeps the fit; again below with its accuracy
    atomic_write_text(COSTS, json.dumps(costs, indent=1) + "\n")
    print(f"wrote {COSTS.relative_to(ROOT)}", flush=True)
    held = json.loads(HELD_OUT_MEASURED.read_text()) if args.fit_only else measure_all(HELD_OUT, HELD_OUT_MEASURED)
    rows = validate(held, costs)
    atomic_write_text(VALIDATION, json.dumps(rows, indent=1))
    # what the estimator prints beside every prediction: how far off it was on held-out models
    for fit_ in costs["fits"].values():
        errs = [v["predicted_bytes"] / v["measured_bytes"] - 1 for v in rows if v["settings"] == fit_["settings"]]
        if errs:
            fit_["validation"] = {"held_out_runs": len(errs), "max_abs_bytes_error": max(abs(e) for e in errs),
                                  "mean_bytes_error": float(np.mean(errs))}
    atomic_write_text(COSTS, json.dumps(costs, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
