"""Where training metrics go: metrics.jsonl, TensorBoard, Weights & Biases and user callbacks."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from piformer.cli import main
from piformer.config import ModelConfig, train_recipe
from piformer.data import prepare
from piformer.logging_sinks import Callback, JSONLSink, WandbSink, per_layer_values, scalars
from piformer.train import train

TINY_TRAIN = dict(max_steps=8, batch_size=8, micro_batch_size=8, lr=3e-3, eval_interval=4, eval_batches=2,
                  log_interval=2, checkpoint_interval=4, warmup=2)
EREG = "EReg(SM(t)+ScFuFFN)"  # has per-layer thresholds and temperatures to log


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare("builtin", d, vocab_size=300, max_files=20, progress=False)
    return d


def _cfgs(preset=EREG, **train_kw):
    return ModelConfig.from_preset(preset, "tiny"), train_recipe("tiny", **{**TINY_TRAIN, **train_kw})


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Recorder:
    """A duck-typed listener (not a Callback subclass): every hook it sees, in order."""

    def __init__(self):
        self.calls: list[tuple] = []

    def on_train_start(self, run_dir):
        self.calls.append(("start", Path(run_dir), (Path(run_dir) / "config.json").is_file()))

    def on_log(self, step, metrics):
        self.calls.append(("log", step, dict(metrics)))

    def on_eval(self, step, metrics):
        self.calls.append(("eval", step, dict(metrics)))

    def on_checkpoint(self, step, which, path):
        self.calls.append(("checkpoint", step, which, Path(path).is_dir()))

    def close(self):
        self.calls.append(("close",))


class EvalOnly(Callback):
    """A Callback subclass overriding one hook: the others are the base class's no-ops."""

    def __init__(self):
        self.val = {}

    def on_eval(self, step, metrics):
        self.val[step] = metrics["val_loss"]


def test_callbacks_see_every_record_evaluation_and_checkpoint(tmp_path, data_dir):
    rec, ev = Recorder(), EvalOnly()
    model_cfg, train_cfg = _cfgs()
    train(model_cfg, train_cfg, data_dir, tmp_path / "run", progress=False, callbacks=[rec, ev])
    calls = rec.calls
    assert calls[0] == ("start", tmp_path / "run", True) and calls[-1] == ("close",)
    logged = _records(tmp_path / "run")
    # the callback gets exactly what metrics.jsonl got, in order, split into training and eval records
    seen = [(c[0], c[1]) for c in calls if c[0] in ("log", "eval")]
    assert seen == [("eval" if r.get("event") == "eval" else "log", r["step"]) for r in logged]
    train_steps = [c[1] for c in calls if c[0] == "log"]
    assert train_steps == list(range(1, 9))
    at_log = {c[1]: c[2] for c in calls if c[0] == "log" and c[1] % 2 == 0}
    assert len(at_log[2]["head_entropy"]) == model_cfg.n_layer and "thresholds" in at_log[2]
    assert len(at_log[2]["temperature"]["mean"]) == model_cfg.n_layer and "reg_outside" in at_log[2]
    ckpts = [(c[1], c[2]) for c in calls if c[0] == "checkpoint"]
    assert {("last", 4), ("last", 8)} <= {(w, s) for s, w in ckpts}
    assert any(w == "best" for _, w in ckpts) and all(c[3] for c in calls if c[0] == "checkpoint")
    assert ev.val == {r["step"]: r["val_loss"] for r in logged if r.get("event") == "eval"} and set(ev.val) == {4, 8}


def test_scalars_and_histograms_per_layer():
    rec = {"step": 3, "loss": 4.0, "grad_norm": float("nan"), "event": None,
           "head_entropy": [[1.0, 3.0], [2.0, None]], "thresholds": [[0.4, 0.6], [0.5, 0.5]],
           "temperature": {"mean": [0.01, 0.02]}, "threshold_stats": {"std": [0.1, 0.0]}}
    got = dict(scalars(rec))
    assert got["entropy/layer_0"] == 2.0 and got["entropy/layer_1"] == 2.0  # None (non-finite) left out
    assert got["temperature/mean/layer_1"] == 0.02 and got["threshold_stats/std/layer_0"] == 0.1
    assert "grad_norm" not in got and got["loss"] == 4.0
    hist = dict(per_layer_values(rec))
    assert hist == {"entropy/layer_0": [1.0, 3.0], "entropy/layer_1": [2.0],
                    "thresholds/layer_0": [0.4, 0.6], "thresholds/layer_1": [0.5, 0.5]}


def test_jsonl_sink_cuts_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    sink = JSONLSink(path, keep_through_step=3)
    sink.on_log(4, {"step": 4, "loss": float("inf")})
    sink.close()
    assert _records_from(path) == [{"step": 1}, {"step": 2}, {"step": 3}, {"step": 4, "loss": None}]


def _records_from(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# optional loggers: missing means a one-line error before anything is written


def test_missing_tensorboard_fails_before_the_run_directory_exists(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    model_cfg, train_cfg = _cfgs(tensorboard=True)
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(model_cfg, train_cfg, data_dir, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    code = main(["train", "--preset", "SM+LN+G", "--size", "tiny", "--data", str(data_dir),
                 "--out", str(tmp_path / "cli"), "--tensorboard", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pip install tensorboard" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cli").exists()


def test_missing_wandb_fails_before_the_run_directory_exists(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="pip install wandb"):
        WandbSink("proj")
    code = main(["train", "--preset", "SM+LN+G", "--size", "tiny", "--data", str(data_dir),
                 "--out", str(tmp_path / "cli"), "--wandb", "proj", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pip install wandb" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cli").exists()


def test_wandb_sink_logs_scalars_and_histograms(tmp_path, data_dir, monkeypatch):
    """Against a stand-in wandb module: what the sink sends, not W&B's servers."""
    sent = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, data, step):
            sent["log"].append((step, data))

        def finish(self):
            sent["finish"] += 1

    fake = types.SimpleNamespace(init=lambda **kw: sent["init"].append(kw) or FakeRun(),
                                 Histogram=lambda values: ("hist", list(values)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    model_cfg, train_cfg = _cfgs()
    train(model_cfg, train_cfg, data_dir, tmp_path / "run", progress=False, callbacks=[WandbSink("proj")])
    (init,) = sent["init"]
    assert init["project"] == "proj" and init["name"] == "run" and init["dir"] == str(tmp_path / "run")
    assert init["config"]["preset"] is None and init["config"]["model"]["n_layer"] == model_cfg.n_layer
    steps = [s for s, _ in sent["log"]]
    assert steps == sorted(steps) and steps[0] == 1
    at2 = next(d for s, d in sent["log"] if s == 2 and "train/loss" in d)
    assert "train/entropy/layer_0" in at2 and at2["entropy/layer_0"][0] == "hist"
    assert "train/temperature/mean/layer_0" in at2 and "thresholds/layer_0" in at2
    assert any("val/val_loss" in d for _, d in sent["log"]) and sent["finish"] == 1


def test_tensorboard_gets_per_layer_entropy_thresholds_and_temperatures(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_cfg, train_cfg = _cfgs(tensorboard=True)
    train(model_cfg, train_cfg, data_dir, tmp_path / "run", progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for layer in range(model_cfg.n_layer):
        assert f"entropy/layer_{layer}" in tags["histograms"] and f"thresholds/layer_{layer}" in tags["histograms"]
        assert f"train/entropy/layer_{layer}" in tags["scalars"]
        assert f"train/temperature/mean/layer_{layer}" in tags["scalars"]
        assert f"train/threshold_stats/std/layer_{layer}" in tags["scalars"]
    assert {"train/loss", "train/reg_outside", "val/val_loss"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("val/val_loss")] == [4, 8]
