"""A miniature tier end to end: data, training, evaluation, entropy, PI cost, secure inference,
figures and the report; then the report's numbers against the runs' own files."""

import json
import os
import re
from pathlib import Path

import pytest

from browser import chromium, probe, raw_markup
from piformer.findings import VERDICTS
from piformer.reproduce import TIERS, RunSpec, Tier, reproduce, slug

try:
    import spu  # noqa: F401

    HAVE_SPU = True
except ImportError:
    HAVE_SPU = False

PRESETS = ("SM+LN+G", "SM+ScFuFFN", "SM(t)+ScFuFFN", "EReg(SM(t)+ScFuFFN)")
MINI = Tier(
    name="mini", note="test miniature", size="tiny",
    train={"max_steps": 12, "batch_size": 8, "micro_batch_size": 8, "eval_interval": 6, "eval_batches": 2,
           "log_interval": 3, "checkpoint_interval": 6, "reg_grad_interval": 6},
    data={"source": "builtin", "max_bytes": 300_000, "vocab_size": 400},
    presets=PRESETS, extra_seeds=(7,),
    variants=(RunSpec("EReg(SM(t)+ScFuFFN)", variant="t=raw", model={"temperature_param": "raw"}),),
    jobs=2, secure_presets=("SM+LN+G", "SM+ScFuFFN"), secure_seq_len=8, entropy_batches=2, smoke=True,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    paths = reproduce(MINI, root, secure=HAVE_SPU)
    return root, paths


def _row(md: str, preset: str, table_marker: str) -> str:
    section = md[md.index(table_marker):]
    return next(line for line in section.splitlines() if line.startswith(f"| `{preset}` |"))


def test_report_has_every_table_and_figure(study):
    root, paths = study
    md = paths["md"].read_text()
    for heading in ("## What was run", "## Perplexity", "## Attention entropy", "## Private-inference cost"):
        assert heading in md
    if HAVE_SPU:
        assert "### Secure two-party inference, measured (SPU)" in md and "WAN total s" in md
    figures = json.loads((root / "reproduce.json").read_text())["figures"]
    assert set(figures) >= {"heatmap", "bands", "dynamics", "thresholds", "temperatures", "loss"}
    for rel in figures.values():
        assert (root / rel).stat().st_size > 5000
        assert f"]({rel})" in md
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == len(figures)
    assert "Smoke view" in md


def test_report_numbers_match_the_runs_files(study):
    root, paths = study
    md = paths["md"].read_text()
    for preset in PRESETS:
        run = root / "runs" / slug(preset)
        ev = json.loads((run / "eval.json").read_text())
        assert f"| {ev['ppl']:.3f} |" in _row(md, preset, "## Perplexity")
        ent = json.loads((run / "entropy.json").read_text())
        row = _row(md, preset, "## Attention entropy")
        for b in ent["bands_max"]:
            assert f"{b * 100:.1f}%" in row
        cost = json.loads((run / "pi_cost_gpt2.json").read_text())
        assert cost["ffn_flops_paper"] in _row(md, preset, "## Private-inference cost")
    # the paper's numbers sit beside ours
    assert "| 2.69 |" in _row(md, "SM+LN+G", "## Perplexity")
    assert "14.5B | 14.5B" in _row(md, "SM+LN+G", "## Private-inference cost")
    assert "1.8B | 1.8B" in _row(md, "SM+ScFuFFN", "## Private-inference cost")


@pytest.mark.skipif(not HAVE_SPU, reason="SecretFlow SPU not installed (pip install 'piformer[pi]')")
def test_findings_open_the_report_with_a_verdict_each(study):
    root, paths = study
    md = paths["md"].read_text()
    assert md.index("## Findings") < md.index("## What was run") < md.index("## Perplexity")
    findings = json.loads(paths["results"].read_text())["findings"]
    assert [f["id"] for f in findings] == [f"F{i}" for i in range(1, 10)]
    for f in findings:
        assert f["verdict"] in VERDICTS and f["criterion"] and f["why"]
        assert f"| {f['id']} |" in md and f"{f['id']} — {f['verdict']}." in md


def test_seeds_and_variants_are_trained_and_pooled(study):
    root, paths = study
    md = paths["md"].read_text()
    manifest = json.loads((root / "reproduce.json").read_text())
    assert len(manifest["runs"]) == 4 + 4 + 1  # presets, a second seed of each claim config, the raw-t variant
    seeded = root / manifest["runs"]["SM+LN+G seed=7"]
    assert json.loads((seeded / "config.json").read_text())["train"]["seed"] == 7
    assert (seeded / "eval.json").is_file() and (seeded / "entropy.json").is_file()
    raw = root / manifest["runs"]["EReg(SM(t)+ScFuFFN) t=raw"]
    assert json.loads((raw / "config.json").read_text())["model"]["temperature_param"] == "raw"
    assert "| `SM+LN+G` | 1337, 7 |" in md.split("## Seed spread")[1]
    section = md.split("## The regulariser at work")[1]
    assert "| `EReg(SM(t)+ScFuFFN)` |" in section and "Temperature parametrisation" in section


def test_secure_rows_come_from_the_measured_runs(study):
    root, paths = study
    md = paths["md"].read_text()
    totals = {}
    for preset in ("SM+LN+G", "SM+ScFuFFN"):
        s = json.loads((root / "runs" / slug(preset) / "pi_secure.json").read_text())
        totals[preset] = s["total_bytes"]
        row = _row(md, preset, "### Secure two-party inference")
        assert f"| {s['total_bytes'] / 2**20:.2f} |" in row
        assert s["accuracy"]["argmax_agreement"] >= 0.75
    assert totals["SM+ScFuFFN"] < totals["SM+LN+G"]


def test_rerun_skips_finished_work(study):
    root, _ = study
    ckpt = root / "runs" / slug("SM+LN+G") / "checkpoints" / "last" / "model.safetensors"
    before = ckpt.stat().st_mtime_ns
    reproduce(MINI, root, secure=HAVE_SPU)
    assert ckpt.stat().st_mtime_ns == before
    stages = json.loads((root / "reproduce.json").read_text())["stages"]
    assert stages["train:SM+LN+G"] < 5  # nothing retrained


@pytest.mark.skipif(chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_a_real_browser(study):
    _, paths = study
    seen = probe(paths["html"])
    assert seen["errors"] == [], seen["errors"]
    assert seen["broken"] == [] and seen["images"] >= 5
    assert min(seen["widths"]) > 200 and seen["tables"] >= 4
    assert raw_markup(seen["text"]) == [] and seen["overflowing"] == 0  # no literal Markdown; wide tables scroll


def test_bad_tier_and_preset_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="valid tiers: quick, cpu, gpt2"):
        reproduce("huge", tmp_path)
    with pytest.raises(ValueError, match="valid presets"):
        reproduce("quick", tmp_path, presets=["SM+XX"])
    assert set(TIERS) == {"quick", "cpu", "gpt2"}


def test_without_spu_the_study_runs_and_says_secure_inference_was_skipped(tmp_path, monkeypatch, capsys):
    import dataclasses

    import piformer.reproduce as rep

    monkeypatch.setattr(rep, "_spu_available", lambda: False)
    tier = dataclasses.replace(MINI, presets=("SM+LN+G",), extra_seeds=(), variants=(), jobs=1,
                               train={**MINI.train, "max_steps": 3, "eval_interval": 3, "checkpoint_interval": 3})
    paths = reproduce(tier, tmp_path, secure=True)
    assert "secure inference is skipped" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "reproduce.json").read_text())
    import sys

    why = "SPU needs Python <= 3.11" if sys.version_info >= (3, 12) else "SPU not installed"
    assert len(manifest["notes"]) == 1 and manifest["notes"][0].startswith(f"secure inference skipped: {why}")
    assert not (tmp_path / "runs" / slug("SM+LN+G") / "pi_secure.json").exists()
    md = paths["md"].read_text()
    assert f"secure inference skipped: {why}" in md  # in "What was run"
    assert f"Secure inference skipped: {why}" in md  # and where the secure table would be


def test_every_configuration_is_priced_by_the_estimator(study):
    """Each run gets the fitted estimate at the paper's shape (both settings) and at its own; a
    run measured under SPU is marked measured beside it, the others 'not measured'."""
    root, paths = study
    md = paths["md"].read_text()
    for preset in PRESETS:
        e = json.loads((root / "runs" / slug(preset) / "pi_estimate.json").read_text())
        row = _row(md, preset, "### Secure cost predicted without SPU")
        for settings in ("default", "optimised"):
            assert f"| {e['paper_shape'][settings]['total_bytes'] / 1e9:.2f} |" in row
        assert e["paper_shape"]["optimised"]["total_bytes"] < e["paper_shape"]["default"]["total_bytes"]
        secure = root / "runs" / slug(preset) / "pi_secure.json"
        assert ("measured (T=" in row) == (HAVE_SPU and secure.is_file()), row
    ln_g = json.loads((root / "runs" / slug("SM+LN+G") / "pi_estimate.json").read_text())
    sm = json.loads((root / "runs" / slug("SM+ScFuFFN") / "pi_estimate.json").read_text())
    assert sm["paper_shape"]["optimised"]["total_bytes"] < ln_g["paper_shape"]["optimised"]["total_bytes"]
