"""Entropy analysis: bands, diagnosis, measurement, run readers, figures and the `entropy` CLI."""

import json
import math

import numpy as np
import pytest
import torch

from piformer.analysis import (
    EntropyHistory,
    EntropyResult,
    analyse_entropy,
    analyse_paths,
    analyse_run,
    entropy_from_attentions,
    entropy_history,
    format_comparison,
    format_result,
    load_or_analyse,
    load_result,
    make_all_figures,
    measure_head_entropy,
    plot_thresholds,
    read_metrics,
    save_result,
    temperature_stats,
    val_batches,
)
from piformer.analysis.figures import FigureUnavailable
from piformer.checkpoint import save_checkpoint
from piformer.cli import main
from piformer.config import ModelConfig
from piformer.entropy import uniform_causal_entropy
from piformer.model import PiGPT

V = 97


# ---------------------------------------------------------------------------------------
# fixtures


def make_data(root, n_train=4000, n_val=3000, seed=0):
    """A prepared data directory in the layout of piformer.data (random tokens)."""
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(0, V, n).astype("<u2").tofile(d / f"{split}.bin")
    (d / "meta.json").write_text(json.dumps({
        "vocab_size": V, "eot_id": 0, "dtype": "uint16",
        "splits": {"train": {"tokens": n_train}, "val": {"tokens": n_val}},
    }))
    return d


def make_run(root, name, preset, data_dir, n_layer=2, n_head=2, block_size=32, seed=0, steps=(5, 10, 15)):
    """A run directory as piformer.train writes it: config.json, status.json, metrics.jsonl, checkpoints."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(preset, size="tiny", n_layer=n_layer, n_head=n_head, block_size=block_size)
    model = PiGPT(cfg)
    run = root / name
    save_checkpoint(run / "checkpoints" / "best", model)
    save_checkpoint(run / "checkpoints" / "last", model)
    (run / "config.json").write_text(json.dumps({
        "preset": preset, "size": "tiny", "model": cfg.to_dict(), "data": {"dir": str(data_dir)},
    }))
    (run / "status.json").write_text(json.dumps({"status": "finished", "step": steps[-1]}))
    rng = np.random.default_rng(seed)
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, steps[-1] + 1):
            rec = {"step": s, "loss": 4.0, "lr": 1e-3}
            if s in steps:
                rec["head_entropy"] = (2.0 + rng.random((n_layer, n_head))).tolist()
                if cfg.entropy_reg:
                    rec["thresholds"] = [[0.5] * n_head] * n_layer
            f.write(json.dumps(rec) + "\n")
    return run, model


def synthetic(name="m", L=4, H=4, T=128, seed=0, **kw):
    rng = np.random.default_rng(seed)
    e = rng.uniform(0.3, 0.7, (L, H)) * math.log(T)
    return analyse_entropy(e, T, name=name, **kw)


# ---------------------------------------------------------------------------------------
# bands


def test_bands_on_synthetic_entropies_have_the_known_answer():
    T = 16
    lt = math.log(T)
    # fractions of log T; max head = 0.4 log T. Relative to max: 0.125, 0.3, 0.65, 1.0 of max -> one per band.
    # Relative to log T: 0.05, 0.12 -> [0, 1/4); 0.26, 0.4 -> [1/4, 1/2).
    e = np.array([[0.05, 0.12], [0.26, 0.40]]) * lt
    r = analyse_entropy(e, T)
    assert r.bands_max == pytest.approx([0.25, 0.25, 0.25, 0.25])
    assert r.bands_logt == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert r.max_head_entropy == pytest.approx(0.4 * lt)
    assert r.e_max == pytest.approx(lt)


def test_bands_like_the_paper_12x12():
    # 144 heads: 48 (33%) near zero, 30 in the middle, 66 near the top (relative to max).
    e = np.full(144, 2.0)
    e[:48] = 0.1
    e[48:78] = 1.5  # max = 3.0 below: 1.5 is exactly max/2 -> band [max/2, 3max/4)
    e[78:] = 3.0
    r = analyse_entropy(e.reshape(12, 12), 128)
    assert r.bands_max == pytest.approx([48 / 144, 0, 30 / 144, 66 / 144])
    assert sum(r.bands_logt) == pytest.approx(1.0)
    assert r.layer_mean[0] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------
# diagnosis


def test_diagnosis_flags_early_layers_near_log_t_as_overloaded():
    T, L, H = 128, 6, 4
    lt = math.log(T)
    e = np.full((L, H), 0.5 * lt)
    e[:2] = 0.97 * lt
    r = analyse_entropy(e, T)
    assert r.diagnosis.overloaded_layers == [0, 1]
    assert r.diagnosis.collapsed_layers == []
    assert len(r.diagnosis.overloaded_heads) == 2 * H
    assert "overloaded if E >=" in r.diagnosis.criteria and "3.639" in r.diagnosis.criteria


def test_diagnosis_flags_deep_layers_near_zero_as_collapsed():
    T, L, H = 128, 6, 4
    e = np.full((L, H), 0.5 * math.log(T))
    e[4:] = 0.01
    e[3, 0] = 0.01  # one collapsed head does not flag its layer (layer_share = 50%)
    r = analyse_entropy(e, T)
    assert r.diagnosis.collapsed_layers == [4, 5]
    assert r.diagnosis.overloaded_layers == []
    assert (3, 0) in r.diagnosis.collapsed_heads
    assert "collapsed if E <" in r.diagnosis.criteria


def _sculpted_model(T=128):
    """A real PiGPT whose first two layers attend uniformly (entropy at the causal ceiling, above
    0.75 log T at T=128) and whose last two attend almost one-hot (entropy near zero)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("SM+LN+G", size="tiny", n_layer=4, n_head=2, n_embd=32, block_size=T)
    model = PiGPT(cfg).eval()
    with torch.no_grad():
        for l, block in enumerate(model.transformer.h):
            a = block.attn
            if l < 2:
                a.q_proj.weight.zero_()
                a.q_proj.bias.zero_()
            else:
                a.q_proj.weight.normal_(0, 3.0)
                a.k_proj.weight.normal_(0, 3.0)
    return model


def test_diagnosis_of_a_real_model_measured_on_batches(tmp_path):
    T = 128
    model = _sculpted_model(T)
    data = make_data(tmp_path)
    e, n = measure_head_entropy(model, val_batches(data, T, batch_size=4, max_batches=3, vocab_size=V))
    assert n == 12
    assert e[:2] == pytest.approx(torch.full((2, 2), uniform_causal_entropy(T), dtype=torch.float64), abs=1e-4)
    r = analyse_entropy(e, T)
    assert r.diagnosis.overloaded_layers == [0, 1]
    assert r.diagnosis.collapsed_layers == [2, 3]
    text = format_result(r)
    assert "entropic overload: layers 0, 1" in text and "entropy collapse:  layers 2, 3" in text


def test_short_context_note_and_the_causal_reference():
    T = 16  # a uniform causal head reaches only 0.69 log T here
    e = np.full((2, 2), uniform_causal_entropy(T))
    r = analyse_entropy(e, T)
    assert r.diagnosis.overloaded_layers == []
    assert any("undetectable" in n for n in r.notes)
    rc = analyse_entropy(e, T, reference="causal")
    assert rc.diagnosis.overloaded_layers == [0, 1]
    assert rc.diagnosis.overload_threshold == pytest.approx(0.75 * uniform_causal_entropy(T))
    with pytest.raises(ValueError, match="reference"):
        analyse_entropy(e, T, reference="max")


def test_non_finite_entropies_are_reported_not_crashed_on():
    e = np.array([[1.0, np.nan], [2.0, 3.0]])
    r = analyse_entropy(e, 32)
    assert any("not finite" in n for n in r.notes)
    assert sum(r.bands_max) == pytest.approx(1.0)
    assert r.bands_max[3] == pytest.approx(1 / 3)
    d = r.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON: NaN became null
    assert d["head_entropy"][0][1] is None
    back = EntropyResult.from_dict(json.loads(json.dumps(d)))
    assert np.isnan(back.head_entropy[0, 1]) and back.bands_max == pytest.approx(r.bands_max)


def test_result_round_trips_through_json(tmp_path):
    r = synthetic(
        thresholds=np.full((4, 4), 0.5),
        temperature=temperature_stats(torch.full((4, 4, 128), 0.01)),
        history=EntropyHistory([1, 2], np.ones((2, 4))),
        status={"status": "diverged", "step": 7, "diverged_at": 7},
    )
    p = save_result(r, tmp_path)
    back = load_result(p)
    assert back.name == r.name and back.status_text == "diverged at step 7"
    np.testing.assert_allclose(back.head_entropy, r.head_entropy)
    np.testing.assert_allclose(back.thresholds, r.thresholds)
    assert back.diagnosis == r.diagnosis
    assert back.history.steps == [1, 2]
    assert back.temperature["mean"] == pytest.approx([0.01] * 4)


# ---------------------------------------------------------------------------------------
# measurement


def test_measurement_weights_batches_by_sequences_and_matches_attentions():
    torch.manual_seed(0)
    model = PiGPT(ModelConfig.from_preset("SM+LN+R", size="tiny")).eval()
    with torch.no_grad():
        for b in model.transformer.h:
            b.attn.q_proj.weight.normal_(0, 0.5)
    idx = torch.randint(0, V, (5, 16))
    e, n = measure_head_entropy(model, [idx[:3], idx[3:]])
    assert n == 5
    with torch.no_grad():
        out = model(idx, return_attention=True)
    direct = entropy_from_attentions(out.attentions).double()
    torch.testing.assert_close(e, direct, atol=1e-5, rtol=1e-5)
    assert model.training is False


def test_val_batches_read_the_validation_split(tmp_path):
    data = make_data(tmp_path, n_val=200)
    val = np.fromfile(data / "val.bin", dtype="<u2")
    batches = list(val_batches(data, 16, batch_size=4, max_batches=None))
    seqs = torch.cat(batches)
    assert seqs.shape == (12, 16)  # (200 - 1) // 16 windows
    for row in seqs:  # every row is a contiguous window of val.bin at a multiple of 16
        starts = [s for s in range(0, 200 - 16, 16) if np.array_equal(val[s:s + 16], row.numpy())]
        assert starts
    assert len(list(val_batches(data, 16, batch_size=4, max_batches=2))) == 2
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        list(val_batches(data, 16, vocab_size=10))


# ---------------------------------------------------------------------------------------
# run directories


def test_metrics_reader_tolerates_torn_lines_and_resumed_steps(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "loss": 3.0},
        {"step": 5, "head_entropy": [[1.0, 3.0], [2.0, None]]},
        {"event": "eval", "val_loss": 2.0},
        {"step": 10, "head_entropy": [[1.0, 1.0], [1.0, 1.0]]},
        {"step": 5, "head_entropy": [[2.0, 2.0], [2.0, 2.0]]},  # a resumed run logs step 5 again
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 11, "head_ent')
    records, bad = read_metrics(p)
    assert len(records) == 5 and bad == 1
    h = entropy_history(records, n_layer=2)
    assert h.steps == [5, 10]
    np.testing.assert_allclose(h.layer_mean, [[2.0, 2.0], [1.0, 1.0]])
    assert entropy_history(records, n_layer=3) is None


def test_analyse_run_reads_everything_a_run_records(tmp_path):
    data = make_data(tmp_path)
    run, model = make_run(tmp_path, "ereg", "EReg(SM(t)+ScFuFFN)", data)
    r = analyse_run(run, batches=2, batch_size=4)
    assert r.name == "EReg(SM(t)+ScFuFFN)" and r.kind == "piformer"
    assert r.head_entropy.shape == (2, 2) and r.n_sequences == 8 and r.seq_len == 32
    assert r.data == str(data)
    np.testing.assert_allclose(r.thresholds, model.thresholds().detach().numpy())
    assert r.temperature["mean"] == pytest.approx([model.config.temperature_init] * 2)
    assert r.history.steps == [5, 10, 15]
    assert r.status_text == "finished"
    # the same numbers as measuring the loaded model directly
    e, _ = measure_head_entropy(model, val_batches(data, 32, 4, 2))
    np.testing.assert_allclose(r.head_entropy, e.numpy(), atol=1e-6)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    data = make_data(tmp_path)
    run, _ = make_run(tmp_path, "a", "SM+LN+G", data)
    (run / "config.json").write_text(json.dumps({"preset": "SM+LN+G"}))
    with pytest.raises(ValueError, match="pass --data DIR"):
        analyse_run(run)
    (run / "config.json").write_text(json.dumps({"preset": "SM+LN+G", "data": {"dir": str(tmp_path / "gone")}}))
    with pytest.raises(FileNotFoundError, match="recorded in"):
        analyse_run(run)
    assert analyse_run(run, data, batches=1).n_sequences == 8  # --data overrides


def test_labels_are_unique_across_runs(tmp_path):
    data = make_data(tmp_path)
    a, _ = make_run(tmp_path, "a", "SM+LN+G", data)
    b, _ = make_run(tmp_path, "b", "SM+LN+G", data, seed=1)
    rs = analyse_paths([a, b], batches=1)
    assert [r.name for r in rs] == ["SM+LN+G (a)", "SM+LN+G (b)"]
    assert "Comparison" in format_comparison(rs)


# ---------------------------------------------------------------------------------------
# figures


def _assert_real_png(path, min_w=400, min_h=250):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (path, img.shape)
    rgb = img[..., :3]
    non_white = (rgb < 0.95).any(axis=-1).mean()
    assert non_white > 0.02, f"{path} is nearly blank ({non_white:.1%} non-white pixels)"
    packed = (rgb * 255).astype(np.int64) @ np.array([65536, 256, 1])
    assert len(np.unique(packed)) > 20  # more than a few flat colours


def _paperlike_results():
    rng = np.random.default_rng(0)
    out = []
    T, L, H = 128, 6, 4
    lt = math.log(T)
    for i, name in enumerate(["SM+LN+G", "SM+LN+R", "SM+LN", "SM+G", "SM+R", "SM"]):
        e = rng.uniform(0.3, 0.7, (L, H)) * lt
        if name in ("SM+G", "SM"):
            e[:2] = 0.78 * lt
        if name == "SM":
            e[4:] = 0.02
        hist = EntropyHistory([10, 20, 30], np.stack([e.mean(1) + k for k in (0.5, 0.2, 0.0)]))
        out.append(analyse_entropy(e, T, name=name, history=hist))
    out.append(analyse_entropy(
        rng.uniform(0.3, 0.7, (L, H)) * lt, T, name="EReg(SM(t)+ScFuFFN)",
        thresholds=rng.normal(0.5, 0.1, (L, H)),
        temperature=temperature_stats(np.exp(rng.normal(-3, 0.5, (L, H, T)))),
    ))
    return out


def test_all_figures_are_written_and_non_trivial(tmp_path):
    results = _paperlike_results()
    figs = make_all_figures(results, tmp_path / "figs")
    assert set(figs) == {"heatmap", "bands", "layer_entropy", "dynamics", "thresholds", "temperatures"}
    assert set(figs.skipped) == {"loss"}  # results carry no losses; run directories do
    for name, png in figs.items():
        assert png.suffix == ".png" and png.parent == tmp_path / "figs"
        svg = png.with_suffix(".svg")
        assert svg.is_file() and svg.stat().st_size > 5000 and "<svg" in svg.read_text()[:500]
        _assert_real_png(png)
    # six configurations in one heatmap figure: a 3 x 3 grid of subplots is wide and tall
    import matplotlib.image as mpimg

    h, w = mpimg.imread(figs["heatmap"]).shape[:2]
    assert w > 1200 and h > 1000


def test_figures_without_the_data_are_skipped_with_a_reason(tmp_path):
    figs = make_all_figures([synthetic("a"), synthetic("b", seed=1)], tmp_path, formats=["png"])
    assert set(figs) == {"heatmap", "bands", "layer_entropy"}
    assert "metrics.jsonl" in figs.skipped["dynamics"]
    assert "thresholds" in figs.skipped["thresholds"]
    assert not list(tmp_path.glob("*.svg"))
    with pytest.raises(FigureUnavailable):
        plot_thresholds([synthetic()], tmp_path)
    with pytest.raises(ValueError, match="unknown figure"):
        make_all_figures([synthetic()], tmp_path, only=["pie"])


def test_make_all_figures_takes_results_loaded_from_run_directories(tmp_path):
    data = make_data(tmp_path)
    run, _ = make_run(tmp_path, "a", "SM+LN+G", data)
    save_result(analyse_run(run, batches=1), run)
    figs = make_all_figures(load_or_analyse([run]), tmp_path / "figs", formats=["png"])
    assert "heatmap" in figs and "dynamics" in figs
    # data flows one way: the plotting code neither loads a run nor measures one
    with pytest.raises(ValueError, match="load_or_analyse"):
        make_all_figures([run], tmp_path / "figs2", formats=["png"])


def test_figures_module_imports_no_checkpoint_model_or_measure_code():
    import ast
    from pathlib import Path

    import piformer.analysis.figures as figures

    tree = ast.parse(Path(figures.__file__).read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    banned = {m for m in imported for b in ("checkpoint", "model", "measure", "runs", "hf") if m.split(".")[-1] == b}
    assert not banned, banned


# ---------------------------------------------------------------------------------------
# CLI


def test_cli_two_runs_table_json_and_figures(tmp_path, capsys):
    data = make_data(tmp_path)
    a, _ = make_run(tmp_path, "a", "SM+LN+G", data)
    b, _ = make_run(tmp_path, "b", "EReg(SM(t)+ScFuFFN)", data, seed=1)
    out = tmp_path / "figs"
    assert main(["entropy", str(a), str(b), "--out", str(out), "--batches", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    for needle in ("== SM+LN+G", "== EReg(SM(t)+ScFuFFN)", "Head bands", "max head entropy", "log T =",
                   "Diagnosis:", "entropic overload:", "entropy collapse:", "Comparison", "Mean head entropy per layer"):
        assert needle in text, needle
    for stem in ("entropy_heatmap", "entropy_bands", "entropy_by_layer", "entropy_dynamics", "thresholds",
                 "temperatures"):
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.svg").is_file(), stem
        _assert_real_png(out / f"{stem}.png", min_w=300, min_h=200)
    saved = json.loads((out / "entropy.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["SM+LN+G", "EReg(SM(t)+ScFuFFN)"]

    assert main(["entropy", str(a), str(b), "--json", "--batches", "1"]) == 0
    payload = json.loads(capsys.readouterr().out)
    r0 = payload["runs"][0]
    assert len(r0["head_entropy"]) == 2 and len(r0["head_entropy"][0]) == 2
    assert r0["units"] == "nats" and len(r0["bands_max"]) == 4 and len(r0["bands_logt"]) == 4
    assert "criteria" in r0["diagnosis"] and "overloaded_layers" in r0["diagnosis"]
    assert payload["runs"][1]["thresholds"] is not None and payload["figures"] is None


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    data = make_data(tmp_path)
    a, _ = make_run(tmp_path, "a", "SM+LN+G", data)
    (a / "config.json").write_text("{}")
    assert main(["entropy", str(a)]) == 2
    err = capsys.readouterr().err
    assert "pass --data DIR" in err and err.count("\n") == 1
    assert main(["entropy", str(tmp_path / "nothing"), "--data", str(data)]) == 2
    assert "no checkpoint or run directory" in capsys.readouterr().err
    assert main(["entropy", str(a), "--data", str(data), "--seq-len", "64"]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(["entropy", str(a), "--data", str(data), "--formats", "gif"]) == 2
    assert main(["entropy", str(a), "--data", str(data), "--text", str(data / "meta.json")]) == 2
    assert "HF model directories only" in capsys.readouterr().err


def test_cli_after_two_real_training_runs(tmp_path, capsys):
    train_mod = pytest.importorskip("piformer.train")
    from piformer.config import train_recipe

    data = make_data(tmp_path, n_train=6000, n_val=2000)
    runs = []
    for preset in ("SM+LN+G", "SM(t)+ScFuFFN"):
        out = tmp_path / "runs" / preset.replace("+", "_").replace("(", "").replace(")", "")
        cfg = ModelConfig.from_preset(preset, size="tiny")
        tcfg = train_recipe("tiny", max_steps=6, log_interval=3, eval_interval=6, checkpoint_interval=6,
                            batch_size=4, micro_batch_size=4)
        train_mod.train(cfg, tcfg, data, out, preset=preset, size="tiny", progress=False)
        runs.append(out)
    figs = tmp_path / "figs"
    assert main(["entropy", *map(str, runs), "--out", str(figs), "--batches", "2", "--quiet", "--formats", "png"]) == 0
    text = capsys.readouterr().out
    assert "== SM+LN+G" in text and "== SM(t)+ScFuFFN" in text and "status: finished" in text
    assert (figs / "entropy_dynamics.png").is_file()  # from the runs' own metrics.jsonl
    assert (figs / "temperatures.png").is_file()
    assert "thresholds" in text  # skipped: no run has the regulariser, and the output says why


def test_cli_keep_going_skips_a_run_without_checkpoint(tmp_path, capsys):
    from piformer.analysis import load_results

    data = make_data(tmp_path)
    a, _ = make_run(tmp_path, "a", "SM+LN+G", data)
    dead = tmp_path / "sm"  # e.g. SM diverged before its first checkpoint: status only
    (dead / "checkpoints").mkdir(parents=True)
    (dead / "status.json").write_text(json.dumps({"status": "diverged", "step": 3, "diverged_at": 3}))
    assert main(["entropy", str(a), str(dead), "--batches", "1"]) == 2  # default: stop
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["entropy", str(a), str(dead), "--batches", "1", "--keep-going", "--out", str(out),
                 "--formats", "png"]) == 1
    cap = capsys.readouterr()
    assert f"skipped {dead}" in cap.err and "== SM+LN+G" in cap.out
    saved = json.loads((out / "entropy.json").read_text())
    assert saved["errors"][0]["path"] == str(dead)
    assert [r.name for r in load_results(out)] == ["SM+LN+G"]


# ---------------------------------------------------------------------------------------
# figures for many runs, loss curves, temperatures at or below zero


def test_run_styles_tell_twenty_runs_apart():
    from piformer.analysis.figures import run_styles

    styles = run_styles(22)
    first20 = [(tuple(s["color"]), s["marker"]) for s in styles[:20]]
    assert len({c for c, _ in first20}) == 20  # 20 distinct colours
    assert all(a[1] != b[1] for a, b in zip(first20, first20[1:]))  # neighbours differ in marker too
    assert styles[20]["linestyle"] == "--" and styles[0]["linestyle"] == "-"  # past 20: dashed


def test_loss_curves_are_read_from_metrics_and_drawn(tmp_path):
    from piformer.analysis.curves import read_loss_curve, read_loss_curves

    data = make_data(tmp_path)
    run, _ = make_run(tmp_path, "a", "SM+LN+G", data, steps=(5, 10, 15, 20))
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"] = {"batch_size": 4}
    (run / "config.json").write_text(json.dumps(cfg))
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "event": "eval", "val_loss": 3.5, "val_ppl": 33.1}) + "\n")
        f.write(json.dumps({"step": 20, "event": "eval", "val_loss": 3.25, "val_ppl": 25.8}) + "\n")
        f.write(json.dumps({"step": 20, "loss": 3.0}) + "\n")  # a resumed run re-logs step 20: the last wins
    curve = read_loss_curve(run, "mine")
    assert curve.name == "mine" and list(curve.steps) == list(range(1, 21))
    assert curve.loss[-1] == 3.0 and curve.loss[0] == 4.0
    assert list(curve.val_steps) == [10, 20] and list(curve.val_loss) == [3.5, 3.25]
    assert curve.tokens_per_step == 4 * 32 and curve.tokens(curve.val_steps)[-1] == 20 * 128
    assert read_loss_curve(tmp_path / "nothing") is None

    save_result(analyse_run(run, batches=1), run)
    results = load_or_analyse([run])
    figs = make_all_figures(results, tmp_path / "figs", formats=["png"], curves=read_loss_curves([run], results))
    assert figs["loss"].name == "loss_curves.png"
    _assert_real_png(figs["loss"])
    # results alone carry no losses: the figure is skipped, saying why
    figs = make_all_figures([synthetic()], tmp_path / "figs2", formats=["png"])
    assert "metrics.jsonl" in figs.skipped["loss"]


def test_negative_temperatures_are_named_for_the_figures_note(tmp_path):
    from piformer.analysis.figures import nonpositive_temperature_runs, plot_temperatures

    rng = np.random.default_rng(0)
    pos = synthetic("exp", temperature=temperature_stats(np.exp(rng.normal(-3, 0.5, (4, 4, 16)))))
    raw = synthetic("raw", temperature=temperature_stats(rng.normal(0.01, 0.05, (4, 4, 16))))
    assert nonpositive_temperature_runs([pos, raw]) == ["raw"]
    assert nonpositive_temperature_runs([pos]) == []
    (png,) = plot_temperatures([pos, raw], tmp_path, formats=["png"])
    _assert_real_png(png)


def test_heatmap_of_seventeen_runs_stays_a_page_wide(tmp_path):
    import matplotlib.image as mpimg

    results = [synthetic(f"run {i}", L=6, H=4, T=64, seed=i) for i in range(17)]
    figs = make_all_figures(results, tmp_path, formats=["png"], only=["heatmap", "bands", "layer_entropy"])
    h, w = mpimg.imread(figs["heatmap"]).shape[:2]
    assert w <= 14 * 150 and h > w  # more rows, not narrower panels
    assert mpimg.imread(figs["bands"]).shape[1] <= 12 * 150


def test_analysis_diagnosis_is_entropy_diagnose_against_the_chosen_reference():
    from piformer.entropy import diagnose

    e = torch.tensor([[3.0, 0.2, 2.5], [0.1, 0.3, 2.9]])
    r = analyse_entropy(e, 64, reference="causal", overload_frac=0.7, collapse_frac=0.2, layer_share=0.6)
    d = diagnose(e, 64, 0.7, 0.2, 0.6, reference=uniform_causal_entropy(64))
    assert r.diagnosis.overload_threshold == d.overload_threshold == 0.7 * uniform_causal_entropy(64)
    assert (r.diagnosis.overloaded_heads, r.diagnosis.collapsed_heads) == (d.overloaded_heads, d.collapsed_heads)
    assert r.diagnosis.collapsed_layers == d.collapsed_layers == [1]
    assert "0.2 x reference" in r.diagnosis.criteria and "uniform causal head" in r.diagnosis.criteria
