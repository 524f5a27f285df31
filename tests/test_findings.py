"""Computed verdicts on the paper's findings (piformer.findings), on synthetic study results."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from piformer.analysis.result import analyse_entropy
from piformer.config import ModelConfig
from piformer.findings import (
    NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, VERDICTS, Finding, Pool, compare, evaluate_findings,
    findings_blocks, spearman,
)
from piformer.pi.cost import pi_cost
from piformer.report_doc import Document

T = 64  # log T = 4.159; top band from 3.119; a uniform causal head reaches 3.206
L, H = 4, 4
HIGH, MID, LOW = 3.15, 2.0, 0.3  # nats: top band, middle, collapse


def entropy_dict(early, deep, *, name="m", seq_len=T, thresholds=None, jitter=0.0):
    """An entropy.json as EntropyResult.to_dict() writes it; first half of layers = early."""
    h = np.empty((L, H))
    h[: L // 2] = early
    h[L // 2:] = deep
    h = h + jitter
    extra = {} if thresholds is None else {"thresholds": np.asarray(thresholds, dtype=float)}
    return analyse_entropy(h, seq_len, name=name, **extra).to_dict()


def varied_thresholds(seed=0):
    rng = np.random.default_rng(seed)
    return 0.5 + 0.1 * rng.standard_normal((L, H)) + np.arange(L)[:, None] * 0.05


_COSTS: dict[str, dict] = {}


def paper_cost(preset):
    if preset not in _COSTS:
        _COSTS[preset] = pi_cost(ModelConfig.from_preset(preset, "gpt2-small"), 128, preset=preset).to_dict()
    return _COSTS[preset]


SECURE_BYTES = {"SM+LN+G": 100e6, "SM+LN+R": 40e6, "SM+ScFuFFN": 25e6}

# preset: (early entropy, deep entropy, ppl or None for diverged)
PAPER_LIKE = {
    "SM+LN+G": (MID, MID, 2.69),
    "SM+LN+R": (MID, MID, 2.76),
    "SM+LN": (MID, MID, 3.38),
    "SM+G": (HIGH, 1.0, 3.20),
    "SM+R": (MID, 1.2, 2.94),
    "SM": (HIGH, LOW, None),
    "SM+WN(FFN)": (HIGH, 1.8, 3.64),
    "SM+SN(FFN)": (HIGH, 1.8, 3.63),
    "SM+ScFFN": (HIGH, 1.8, 3.48),
    "SM+ScFuFFN": (HIGH, 1.8, 3.48),
    "SM(t)+ScFuFFN": (HIGH, 1.8, 3.40),
    "EReg(SM(t)+ScFuFFN)": (MID, 1.8, 3.21),
}


def make_run(preset, seed=0, *, early=MID, deep=MID, ppl=3.0, status=None, variant="", entropy="auto",
             thresholds=None, secure="auto", jitter=0.0):
    diverged = ppl is None
    st = status or ("diverged" if diverged else "finished")
    if entropy == "auto":
        if thresholds is None and preset.startswith("EReg"):
            thresholds = varied_thresholds(seed)
        entropy = entropy_dict(early, deep, name=preset, thresholds=thresholds, jitter=jitter)
    if secure == "auto":
        b = SECURE_BYTES.get(preset)
        secure = None if b is None else {
            "seq_len": 16, "total_bytes": b, "total_messages": 10,
            "latency": {"WAN": {"total_s": b / 1e7}, "LAN": {"total_s": b / 1e9}}}
    return {
        "label": preset + (f" {variant}" if variant else "") + (f" seed {seed}" if seed else ""),
        "preset": preset, "seed": seed, "variant": variant, "dir": f"runs/{preset}-{seed}",
        "status": {"status": st, "step": 300, **({"diverged_at": 120} if st == "diverged" else {})},
        "eval": None if diverged else {"val_loss": math.log(ppl), "ppl": ppl, "val_tokens": 1000, "step": 300},
        "entropy": entropy,
        "pi_cost": None,
        "pi_cost_paper_shape": paper_cost(preset) if preset in SECURE_BYTES else None,
        "pi_secure": secure,
    }


def study(overrides=None, seeds=(0, 1), drop=()):
    """Every configuration, two seeds each (tiny jitter so that spreads are non-zero)."""
    spec = {**PAPER_LIKE, **(overrides or {})}
    runs = []
    for p, (early, deep, ppl) in spec.items():
        if p in drop:
            continue
        for i, s in enumerate(seeds):
            runs.append(make_run(p, s, early=early, deep=deep, ppl=None if ppl is None else ppl + 0.005 * i,
                                 jitter=0.002 * i))
    return {"manifest": {}, "runs": runs, "data": {}}


def by_id(results):
    return {f.id: f for f in evaluate_findings(results)}


@pytest.fixture(scope="module")
def good():
    return by_id(study())


# ----------------------------------------------------------------------------------------
# The paper-like study reproduces everything; each finding can also fail


def test_paper_like_study_reproduces_every_finding(good):
    assert set(good) == {f"F{i}" for i in range(1, 10)}
    for f in good.values():
        assert f.verdict == REPRODUCED, (f.id, f.why)
        assert f.claim and f.criterion and f.why and f.ours


def test_findings_are_json_ready(good):
    for f in good.values():
        json.dumps(f.to_dict(), allow_nan=False)
        json.dumps(f.numbers, allow_nan=False)
        assert f.verdict in VERDICTS


@pytest.mark.parametrize("fid, overrides", [
    ("F1", {"SM+R": (MID, 2.5, 2.94)}),                     # SM+R's deep layers above the baseline's
    ("F2", {"SM+G": (MID, 1.0, 3.20)}),                     # SM+G does not overload early
    ("F3", {"SM+ScFFN": (MID, 1.8, 3.48)}),                 # ScFFN removes the overload too
    ("F3", {"SM+WN(FFN)": (HIGH, 0.2, 3.64)}),              # WN does not lift deep entropy over SM's
    ("F4", {"EReg(SM(t)+ScFuFFN)": (HIGH, 1.8, 3.21)}),     # no change in the early layers
    ("F5", {"EReg(SM(t)+ScFuFFN)": (MID, 1.8, 3.60)}),      # EReg worse
    ("F6", {"SM+LN+G": (MID, MID, 3.9), "SM+LN+R": (MID, MID, 3.8), "SM+LN": (MID, MID, 2.5),
            "SM+G": (HIGH, 1.0, 2.6), "SM+R": (MID, 1.2, 2.7)}),  # ordering reversed
])
def test_each_finding_can_fail(fid, overrides):
    f = by_id(study(overrides))[fid]
    assert f.verdict == NOT_REPRODUCED, f.why


def test_f7_thresholds_that_never_moved_are_not_reproduced():
    res = study()
    for r in res["runs"]:
        if r["preset"].startswith("EReg"):
            r["entropy"] = entropy_dict(MID, 1.8, thresholds=np.full((L, H), 0.5))
    f = by_id(res)["F7"]
    assert f.verdict == NOT_REPRODUCED
    assert f.numbers["per_seed"][0]["mean_within_layer_std"] == 0.0


def test_f7_one_uniform_layer_fails_the_every_layer_rule():
    th = varied_thresholds()
    th[2] = 0.7  # layer 2: all heads equal
    res = study()
    for r in res["runs"]:
        if r["preset"].startswith("EReg"):
            r["entropy"] = entropy_dict(MID, 1.8, thresholds=th)
    f = by_id(res)["F7"]
    assert f.verdict == NOT_REPRODUCED and "ii" in f.why


def test_f8_measured_order_wrong_is_not_reproduced():
    res = study()
    for r in res["runs"]:
        if r["preset"] == "SM+ScFuFFN":
            r["pi_secure"]["total_bytes"] = 60e6  # saves less than ReLU (40e6)
    f = by_id(res)["F8"]
    assert f.verdict == NOT_REPRODUCED
    assert f.numbers["measured"]["SM+LN+R"]["comm_saving"] == pytest.approx(2.5)


def test_f8_without_secure_runs_is_not_testable_but_reports_analytic_numbers():
    res = study()
    for r in res["runs"]:
        r["pi_secure"] = None
    f = by_id(res)["F8"]
    assert f.verdict == NOT_TESTABLE and "pi_secure" in f.why
    ana = f.numbers["analytic_paper_shape"]
    assert f.numbers["analytic_direction_ok"] is True
    assert ana["SM+ScFuFFN"]["flops_saving"] > 1 and ana["SM+LN+R"]["flops_saving"] == pytest.approx(1.0)


def test_f8_reproduced_numbers(good):
    m = good["F8"].numbers["measured"]
    assert m["SM+LN+R"]["comm_saving"] == pytest.approx(2.5) and m["SM+ScFuFFN"]["comm_saving"] == pytest.approx(4.0)


# ----------------------------------------------------------------------------------------
# Seeds


def test_compare_rules():
    assert compare(Pool([2.0, 2.1], [0, 1]), Pool([1.0, 1.05], [0, 1]))["outcome"] == "beyond"
    assert compare(Pool([2.0, 2.5], [0, 1]), Pool([1.9, 2.0], [0, 1]))["outcome"] == "noise"
    assert compare(Pool([2.0], [0]), Pool([1.9, 2.0], [0, 1]))["outcome"] == "point"
    assert compare(Pool([1.0, 1.1], [0, 1]), Pool([2.0, 2.1], [0, 1]))["outcome"] == "wrong"
    assert compare(Pool([1.0], [0]), Pool([1.0], [0]))["outcome"] == "wrong"  # no difference
    assert compare(Pool([], []), Pool([1.0], [0]))["outcome"] == "missing"
    p = Pool([1.0, 3.0, 2.0], [0, 1, 2])
    assert p.mean == 2.0 and p.spread == 2.0 and Pool([1.0], [0]).spread is None


def _f5_with(ereg_ppls, sc_ppls):
    res = study()
    res["runs"] = [r for r in res["runs"] if r["preset"] not in ("EReg(SM(t)+ScFuFFN)", "SM+ScFuFFN")]
    res["runs"] += [make_run("EReg(SM(t)+ScFuFFN)", i, early=MID, deep=1.8, ppl=p) for i, p in enumerate(ereg_ppls)]
    res["runs"] += [make_run("SM+ScFuFFN", i, early=HIGH, deep=1.8, ppl=p) for i, p in enumerate(sc_ppls)]
    return by_id(res)["F5"]


def test_difference_within_seed_spread_is_noise():
    f = _f5_with([3.20, 3.50], [3.30, 3.52])  # EReg lower on average, but by less than the spread
    assert f.verdict == NOT_REPRODUCED
    assert "within seed noise" in f.why
    assert f.numbers["comparison"]["outcome"] == "noise"


def test_difference_beyond_seed_spread_is_reproduced():
    f = _f5_with([3.20, 3.22], [3.48, 3.50])
    assert f.verdict == REPRODUCED and f.numbers["comparison"]["outcome"] == "beyond"
    assert f.numbers["relative_improvement"] == pytest.approx(1 - 3.21 / 3.49)


def test_single_seed_is_judged_on_point_estimate_with_caveat():
    f = _f5_with([3.21], [3.48])
    assert f.verdict == REPRODUCED and "single seed" in f.why
    assert f.numbers["ppl"]["SM+ScFuFFN"]["spread"] is None


def test_variant_runs_are_not_pooled_and_running_runs_are_left_out():
    res = study()
    res["runs"].append(make_run("EReg(SM(t)+ScFuFFN)", 0, variant="t=raw", early=MID, deep=1.8, ppl=10.0))
    res["runs"].append(make_run("EReg(SM(t)+ScFuFFN)", 7, status="running", early=MID, deep=1.8, ppl=9.0))
    f = by_id(res)["F5"]
    assert f.verdict == REPRODUCED
    assert f.numbers["ppl"]["EReg(SM(t)+ScFuFFN)"]["seeds"] == [0, 1]


# ----------------------------------------------------------------------------------------
# Missing data and divergence


def test_missing_runs_are_not_testable_and_say_what_is_missing():
    fs = by_id(study(drop=("EReg(SM(t)+ScFuFFN)", "SM(t)+ScFuFFN")))
    for fid in ("F4", "F5", "F7"):
        assert fs[fid].verdict == NOT_TESTABLE
        assert "EReg(SM(t)+ScFuFFN)" in fs[fid].why or "SM(t)+ScFuFFN" in fs[fid].why
    assert fs["F1"].verdict == REPRODUCED


def test_missing_entropy_file_is_not_testable():
    res = study()
    for r in res["runs"]:
        if r["preset"] == "SM+G":
            r["entropy"] = None
    fs = by_id(res)
    assert fs["F1"].verdict == NOT_TESTABLE and "SM+G" in fs["F1"].why
    assert fs["F2"].verdict == NOT_TESTABLE
    assert fs["F6"].verdict == REPRODUCED  # perplexity needs no entropy


@pytest.mark.parametrize("results", [{}, {"runs": []}, None, {"runs": [{"preset": "SM", "entropy": {"x": 1}}]},
                                     {"runs": [{"preset": "SM+LN+G", "entropy": {"head_entropy": "bad", "seq_len": 3},
                                                "eval": {"ppl": "x"}, "status": None}]}])
def test_empty_or_malformed_results_never_crash(results):
    fs = evaluate_findings(results)
    assert [f.id for f in fs] == [f"F{i}" for i in range(1, 10)]
    assert all(f.verdict == NOT_TESTABLE for f in fs)


def test_diverged_run_with_nan_entropy():
    res = study()
    for r in res["runs"]:
        if r["preset"] == "SM":
            r["entropy"] = entropy_dict(HIGH, float("nan"), name="SM")  # deep heads NaN
    fs = by_id(res)
    f1 = fs["F1"]
    assert f1.verdict == REPRODUCED and f1.numbers["excluded_non_finite"] == ["SM"] and "SM" in f1.why
    assert fs["F2"].verdict == REPRODUCED  # SM's early heads are finite, still used
    f3 = fs["F3"]
    assert f3.verdict == REPRODUCED and f3.numbers["SM_deep_not_finite"] is True
    f6 = fs["F6"]
    assert f6.numbers["SM_diverged"] is True and f6.numbers["ours_rank"]["SM"] == 6
    assert "diverged" in f6.why


def test_sm_that_did_not_diverge_is_noted():
    f = by_id(study({"SM": (HIGH, LOW, 4.5)}))["F6"]
    assert f.verdict == REPRODUCED and "did not diverge" in f.why and f.numbers["SM_diverged"] is False


def test_all_seeds_of_ereg_diverged():
    f = _f5_with([None, None], [3.48, 3.50])
    assert f.verdict == NOT_REPRODUCED and "diverged" in f.why.lower()


def test_the_top_band_is_measured_against_the_causal_ceiling_not_log_t():
    """At T=64 uniform causal attention has C = 3.21 nats and 3/4 log T = 3.12: a head at 3.0 nats is
    overloaded (>= 3/4 C = 2.41) although below 3/4 log T. The log-T share is reported, not judged."""
    res = study()
    for r in res["runs"]:
        early = 3.0 if r["preset"] in ("SM", "SM+G") else 2.0
        r["entropy"] = entropy_dict(early, 1.0, seq_len=64, name=r["preset"])
    f = by_id(res)["F2"]
    assert f.verdict == REPRODUCED
    assert f.numbers["top_band_from"] == pytest.approx(0.75 * math.lgamma(65) / 64)
    assert f.numbers["early_top_band_share"]["SM"]["mean"] == 1.0
    assert f.numbers["early_top_band_share_vs_log_T"]["SM"]["mean"] == 0.0  # the stricter rule, shown
    for r in res["runs"]:  # below 3/4 C everywhere: no overload anywhere
        r["entropy"] = entropy_dict(2.3, 1.0, seq_len=64, name=r["preset"])
    assert by_id(res)["F2"].verdict == NOT_REPRODUCED


# ----------------------------------------------------------------------------------------
# Verdicts agree with their numbers; rendering


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, math.inf, math.inf], [1, 2, 3, 4]) == pytest.approx(0.9486833)


def test_verdicts_never_contradict_numbers():
    cases = [study(), study({"EReg(SM(t)+ScFuFFN)": (MID, 1.8, 3.60)}),
             study({"SM+LN+G": (MID, MID, 3.9), "SM+LN": (MID, MID, 2.5)})]
    for res in cases:
        fs = by_id(res)
        rho = fs["F6"].numbers["spearman_rho"]
        assert (fs["F6"].verdict == REPRODUCED) == (rho >= fs["F6"].numbers["bar"])
        out = fs["F5"].numbers["comparison"]["outcome"]
        assert (fs["F5"].verdict == REPRODUCED) == (out in ("beyond", "point"))
        for cid, c in fs["F1"].numbers["comparisons"].items():
            if fs["F1"].verdict == REPRODUCED:
                assert c["diff"] > 0


def test_findings_blocks_render(tmp_path):
    fs = evaluate_findings(study(drop=("SM(t)+ScFuFFN",)))
    blocks = findings_blocks(fs)
    md = Document("r", blocks).to_markdown(tmp_path)
    assert "| finding | claim (paper evidence) | our numbers | verdict |" in md
    assert "reproduced" in md and "not testable at this scale" in md
    for f in fs:
        assert f"{f.id} — {f.verdict}." in md
    html = Document("r", blocks).to_html()
    assert "not testable at this scale" in html and "<table>" in html


def test_finding_to_dict_turns_nan_into_none():
    f = Finding("F0", "c", "r", numbers={"x": float("nan"), "y": np.float64(1.5), "z": [np.inf]})
    assert f.to_dict()["numbers"] == {"x": None, "y": 1.5, "z": [None]}


def test_results_are_not_mutated():
    res = study()
    before = copy.deepcopy(res)
    evaluate_findings(res)
    assert json.dumps(res, default=str, sort_keys=True) == json.dumps(before, default=str, sort_keys=True)


def test_nan_perplexity_of_a_finished_run_counts_as_diverged():
    res = study()
    for r in res["runs"]:
        if r["preset"] == "SM":
            r["status"] = {"status": "finished", "step": 300}
            r["eval"] = {"val_loss": None, "ppl": None, "val_tokens": 1000, "step": 300}
    f = by_id(res)["F6"]
    assert f.numbers["diverged_seeds"]["SM"] == 2 and f.numbers["SM_diverged"] is True


def test_baseline_of_f5_diverged_everywhere_passes_without_single_seed_caveat():
    f = _f5_with([3.21, 3.22], [None, None])
    assert f.verdict == REPRODUCED and "diverged" in f.why and "single seed" not in f.why


def test_f9_credits_the_regulariser_only_beyond_its_twin():
    good = by_id(study())["F9"]
    assert good.verdict == REPRODUCED and good.numbers["regulariser_gain"] > 0
    assert good.numbers["temperature_gain_over_SM+ScFuFFN"] == pytest.approx(1 - 3.4025 / 3.4825)
    # the twin as good as EReg (within the seeds' spread): the gain over SM+ScFuFFN is the temperature's
    noisy = study({"SM(t)+ScFuFFN": (HIGH, 1.8, 3.2125)})
    for r in noisy["runs"]:  # EReg 3.10 and 3.30: mean 3.20, below the twin's 3.215, spread 0.2
        if r["preset"] == "EReg(SM(t)+ScFuFFN)":
            r["eval"]["ppl"] = 3.30 if r["seed"] == 1 else 3.10
    f = by_id(noisy)["F9"]
    assert f.verdict == NOT_REPRODUCED and "noise" in f.why and "temperature alone" in f.why
    assert by_id(study({"SM(t)+ScFuFFN": (HIGH, 1.8, 3.10)}))["F9"].verdict == NOT_REPRODUCED
    assert by_id(study(drop=("SM(t)+ScFuFFN",)))["F9"].verdict == NOT_TESTABLE
