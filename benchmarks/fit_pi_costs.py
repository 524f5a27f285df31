"""Fit (and validate) the secure-cost estimator behind `piformer pi-cost --secure`.

1. measure: run small models under SPU (`run_secure`, both parties in this process) at varied
   widths, heads, lengths and vocabulary chunkings, for each SPU settings preset, and keep every
   step's bytes, messages and seconds with its shape features
   (results/pi/spu_cost_measurements.json, appended as each run ends: a rerun resumes);
2. fit: for every step kind, non-negative least squares of each quantity on the kind's features
   (`piformer.pi.estimate.FEATURES`); the one-time setup and the reveal's bytes per logit too;
   written to src/piformer/pi/spu_costs.json, keyed by SPU version, protocol and settings;
3. validate: models NOT used in the fit (other depths, widths, lengths, and presets that are not
   in the fit) measured end to end under SPU against the prediction. Two such sets:
   * DEV (`HELD_OUT`, results/pi/estimator_holdout_measurements.json -> estimator_validation.json):
     looked at many times while the features were designed, so no longer an unbiased test;
   * TEST (`TEST`, results/pi/estimator_test_measurements.json -> estimator_test_validation.json):
     shapes chosen and measured only after the features were frozen (`--test`);
   and the GPT-2-scale whole-model runs of results/pi/gpt2_e2e.json (never fitted on)
   -> results/pi/estimator_gpt2.json.

    nohup python benchmarks/fit_pi_costs.py > out/fit_pi_costs.log 2>&1 &     # fit + dev, ~1 h on 2 cores
    nohup python benchmarks/fit_pi_costs.py --test > out/fit_test.log 2>&1 &  # measure the test set (~20 min)
    python benchmarks/fit_pi_costs.py --fit-only                              # refit from saved measurements
    python benchmarks/fit_pi_costs.py --report-only                           # the validation tables
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
TEST_MEASURED = ROOT / "results/pi/estimator_test_measurements.json"
TEST_VALIDATION = ROOT / "results/pi/estimator_test_validation.json"
GPT2_E2E = ROOT / "results/pi/gpt2_e2e.json"
GPT2_VALIDATION = ROOT / "results/pi/estimator_gpt2.json"
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
    # added with the quantised features: longer sequences (attention matrices of up to 6 HE
    # batches of 8,192 values) and wider models (more matrix-product blocks), still one block each
    ("SM+LN+R", 1, 64, 4, 96, 128, 128),
    ("SM(t)+ScFuFFN", 1, 192, 6, 72, 256, 256),
    ("SM+LN+G", 1, 48, 2, 112, 160, 160),
    ("SM+LN+R", 1, 320, 4, 40, 300, 300),
    ("SM(t)+ScFuFFN", 1, 96, 8, 80, 200, 200),
    ("SM+LN+G", 1, 160, 4, 64, 256, 256),
    # LayerNorm and GELU on more than 2 x 8,192 values (HE products instead of Beaver triples)
    ("SM+LN+R", 1, 256, 2, 96, 128, 128),
    ("SM+LN+G", 1, 256, 2, 72, 128, 128),
    # the softmax's optional clip of x - max at -20 (8th entry: exp_clip)
    ("SM+LN+R", 1, 64, 4, 64, 128, 128, 20.0),
    ("SM(t)+ScFuFFN", 1, 96, 4, 96, 128, 128, 20.0),
    ("SM+LN+G", 1, 64, 2, 48, 128, 128, 20.0),
    # the packed causal softmax (9th entry: causal_pack), lengths below, at and above its 32 groups
    ("SM(t)+ScFuFFN", 1, 32, 2, 16, 64, 64, None, True),
    ("SM(t)+ScFuFFN", 1, 32, 4, 48, 64, 64, None, True),
    ("SM(t)+ScFuFFN", 1, 32, 2, 96, 64, 64, None, True),
    ("SM(t)+ScFuFFN", 1, 48, 6, 64, 64, 64, None, True),
    ("SM(t)+ScFuFFN", 1, 64, 8, 80, 64, 64, None, True),
    ("SM(t)+ScFuFFN", 1, 48, 4, 112, 64, 64, None, True),
    ("SM(t)+ScFuFFN", 1, 32, 4, 72, 64, 64, 20.0, True),
    ("SM(t)+ScFuFFN", 1, 64, 8, 96, 64, 64, 20.0, True),
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
# The fresh test set: chosen after the quantised features were frozen (and measured after),
# other depths, widths and lengths than the fit's, four presets that are not in the fit
# (SM+ScFFN, SM+G, SM+ScFuFFN, SM) and one run with the softmax clip.
TEST = [
    ("SM+ScFFN", 2, 112, 4, 88, 320, 160),
    ("SM+G", 2, 80, 5, 72, 250, 125),
    ("SM+ScFuFFN", 3, 224, 7, 48, 400, 200),
    ("SM+LN+G", 2, 176, 4, 60, 350, 175),
    ("SM", 3, 72, 3, 100, 200, 100),
    ("SM+LN+R", 2, 288, 6, 76, 300, 150),
    ("SM+ScFuFFN", 2, 96, 4, 112, 200, 100, 20.0),
    # the packed causal softmax: chosen with its features (2026-12-04), before any was measured;
    # two presets not in the fit, and lengths the packed fit runs do not have
    ("SM+LN+G", 2, 96, 6, 88, 200, 100, None, True),
    ("SM+ScFuFFN", 3, 128, 8, 120, 300, 150, 20.0, True),
    ("SM+LN+R", 2, 64, 4, 56, 250, 125, None, True),
    ("SM+G", 2, 80, 5, 104, 150, 150, None, True),
]


def _cfg(case):
    from piformer.config import ModelConfig

    preset, L, d, H, T, V = case[:6]
    return ModelConfig.from_preset(preset, size="tiny", n_layer=L, n_embd=d, n_head=H, block_size=T, vocab_size=V)


def _exp_clip(case):
    """A case's optional 8th entry: the softmax's exp_clip (None: no clip)."""
    return case[7] if len(case) > 7 else None


def _causal_pack(case) -> bool:
    """A case's optional 9th entry: the packed causal softmax."""
    return bool(case[8]) if len(case) > 8 else False


def _ln_wide(case) -> bool:
    """A case's optional 10th entry: the wide LayerNorm (only GPT-2-scale runs have it)."""
    return bool(case[9]) if len(case) > 9 else False


def _program_options(case) -> dict:
    """The case's program-shaping settings, as `SPUSettings.program_options()` names them."""
    return {"exp_clip": _exp_clip(case), "causal_pack": _causal_pack(case), "ln_wide": _ln_wide(case)}


def _settings(case, settings_name: str):
    from piformer.pi.spu_backend import SPUSettings

    return SPUSettings.preset(settings_name, **_program_options(case))


def _model(case):
    import torch

    from piformer.model import PiGPT
    from piformer.pi.jax_forward import state_dict_to_numpy

    torch.manual_seed(0)
    cfg = _cfg(case)
    return cfg, state_dict_to_numpy(PiGPT(cfg).eval())


def _steps_with_features(run) -> list[dict]:
    """A measured run's steps with their features computed now, from the case (the stored ones
    are those of the estimator that measured them)."""
    from piformer.pi import jax_forward as jf
    from piformer.pi.estimate import step_features, step_kind

    case = run["case"]
    cfg = _cfg(case)
    program = jf.build_program(cfg, case[4], vocab_chunk=case[6], **_program_options(case))
    by_name = {s["name"]: s for s in run["steps"]}
    out = []
    for step in program.steps:
        kind = step_kind(step.key)
        if kind is not None:
            out.append({**by_name[step.name], "kind": kind, "features": step_features(step, program, cfg)})
    return out


def _measure(case, settings_name: str):
    from piformer.pi import jax_forward as jf
    from piformer.pi.estimate import step_features, step_kind
    from piformer.pi.secure import run_secure

    cfg, sd = _model(case)
    T, chunk = case[4], case[6]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, T)
    settings = _settings(case, settings_name)
    t0 = time.perf_counter()
    r = run_secure(sd, cfg, ids, settings, vocab_chunk=chunk)
    program = jf.build_program(cfg, T, vocab_chunk=chunk, **settings.program_options())
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


def measure_all(cases, path: Path, settings=SETTINGS) -> list:
    runs = json.loads(path.read_text()) if path.exists() else []
    for settings_name in settings:
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
        steps = [s for r in mine for s in _steps_with_features(r)]
        for kind, names in FEATURES.items():
            rows = [s for s in steps if s["kind"] == kind]
            if not rows:
                continue
            X = np.array([[s["features"][n] for n in names] for s in rows])
            scale = X.max(axis=0)  # columns of very different magnitudes: solve on a scaled copy
            scale[scale == 0] = 1.0  # a feature these runs never exercise gets 0
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

    rows = []
    for r in runs:
        cfg = _cfg(r["case"])
        settings = _settings(r["case"], r["settings"])
        est = estimate(cfg, r["case"][4], settings, vocab_chunk=r["case"][6], costs=costs)
        rows.append({"case": r["case"], "settings": r["settings"],
                     "measured_bytes": r["total_bytes"], "predicted_bytes": est.total("bytes"),
                     "measured_messages": r["total_messages"], "predicted_messages": est.total("messages"),
                     "measured_s": r["compute_s"], "predicted_s": est.total("seconds")})
    return rows


def validate_gpt2(costs: dict) -> list[dict]:
    """The whole-model GPT-2-scale runs of results/pi/gpt2_e2e.json (every block run) against
    the prediction: never fitted on."""
    from piformer.config import ModelConfig
    from piformer.pi.estimate import estimate
    from piformer.pi.spu_backend import SPUSettings

    rows = []
    for key, entry in json.loads(GPT2_E2E.read_text()).items():
        if "report" not in entry:  # a run that did not finish (bench_pi_gpt2_e2e.py saves those too)
            continue
        rep = entry["report"]
        cfg = ModelConfig(**rep["config"])
        if rep["layers_run"] != cfg.n_layer:
            continue
        settings = SPUSettings(**rep["settings"])
        vocab_chunk = int(rep.get("vocab_chunk") or 4096)
        est = estimate(cfg, rep["seq_len"], settings, vocab_chunk=vocab_chunk, costs=costs)
        preset = key.split("/")[0]
        rows.append({"run": key, "case": [preset, cfg.n_layer, cfg.n_embd, cfg.n_head, rep["seq_len"],
                                          cfg.vocab_size, vocab_chunk]
                 + ([settings.exp_clip, settings.causal_pack, settings.ln_wide]
                    if settings.exp_clip or settings.causal_pack or settings.ln_wide else []),
                     "settings": key.split("/")[1], "command": entry["command"],
                     "measured_bytes": rep["total_bytes"], "predicted_bytes": est.total("bytes"),
                     "measured_messages": rep["total_messages"], "predicted_messages": est.total("messages"),
                     "measured_s": rep["wall_s"], "predicted_s": est.total("seconds")})
    return rows


def table(rows: list[dict], what: str = "held-out runs") -> str:
    out = ["| settings | preset | L | d | H | T | V / chunk | measured MB | predicted MB | error | "
           "measured messages | predicted messages |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for v in rows:
        preset, L, d, H, T, V, chunk = v["case"][:7]
        if _exp_clip(v["case"]) is not None:
            preset += f" (exp_clip {v['case'][7]:g})"
        if _causal_pack(v["case"]):
            preset += " (causal-pack)"
        if _ln_wide(v["case"]):
            preset += " (ln-wide)"
        err = v["predicted_bytes"] / v["measured_bytes"] - 1
        out.append(f"| {v['settings']} | {preset} | {L} | {d} | {H} | {T} | {V} / {chunk} | "
                   f"{v['measured_bytes'] / 1e6:.2f} | {v['predicted_bytes'] / 1e6:.2f} | {err:+.1%} | "
                   f"{v['measured_messages']:,} | {v['predicted_messages']:,.0f} |")
    errs = [abs(v["predicted_bytes"] / v["measured_bytes"] - 1) for v in rows]
    out.append(f"\nlargest |error| in total bytes: {max(errs):.1%} over {len(rows)} {what}; "
               f"{sum(e <= 0.05 for e in errs)}/{len(rows)} within the 5% target")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit-only", action="store_true", help="refit and validate from saved measurements")
    p.add_argument("--report-only", action="store_true", help="print the saved validation tables")
    p.add_argument("--test", action="store_true", help="also measure the fresh test set (after freezing the features)")
    args = p.parse_args()
    reports = [(VALIDATION, "DEV set (held out, but looked at while designing the features)", "dev runs"),
               (TEST_VALIDATION, "TEST set (chosen and measured after the features were frozen)", "test runs"),
               (GPT2_VALIDATION, "GPT-2 scale, whole models (results/pi/gpt2_e2e.json)", "GPT-2-scale runs")]
    if args.report_only:
        for path, title, what in reports:
            if path.exists():
                print(f"\n{title}\n\n{table(json.loads(path.read_text()), what)}")
        return 0
    runs = json.loads(MEASURED.read_text()) if args.fit_only else measure_all(FIT, MEASURED)
    costs = fit(runs)
    # written now, so an interrupted validation (minutes of SPU runs) keeps the fit; again below with its accuracy
    atomic_write_text(COSTS, json.dumps(costs, indent=1) + "\n")
    print(f"wrote {COSTS.relative_to(ROOT)}", flush=True)
    held = json.loads(HELD_OUT_MEASURED.read_text()) if args.fit_only else measure_all(HELD_OUT, HELD_OUT_MEASURED)
    dev = validate(held, costs)
    atomic_write_text(VALIDATION, json.dumps(dev, indent=1))
    if args.test:
        measure_all(TEST, TEST_MEASURED, settings=("optimised", "default", "optimised-lsb-error"))
    test = validate(json.loads(TEST_MEASURED.read_text()), costs) if TEST_MEASURED.exists() else []
    if test:
        atomic_write_text(TEST_VALIDATION, json.dumps(test, indent=1))
    gpt2 = validate_gpt2(costs)
    atomic_write_text(GPT2_VALIDATION, json.dumps(gpt2, indent=1))
    # what the estimator prints beside every prediction: how far off it was on held-out models
    # (the fresh test set once it is measured, else the dev set)
    for fit_ in costs["fits"].values():
        for name, rows in (("test", test), ("dev", dev)):
            errs = [v["predicted_bytes"] / v["measured_bytes"] - 1 for v in rows if v["settings"] == fit_["settings"]]
            if errs:
                fit_["validation"] = {"set": name, "held_out_runs": len(errs),
                                      "max_abs_bytes_error": max(abs(e) for e in errs),
                                      "mean_bytes_error": float(np.mean(errs))}
                break
    atomic_write_text(COSTS, json.dumps(costs, indent=1) + "\n")
    for path, title, what in reports:
        if path.exists():
            print(f"\n{title}\n\n{table(json.loads(path.read_text()), what)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
