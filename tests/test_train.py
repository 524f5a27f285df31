"""Training: schedule, exact resume, kill-safe checkpoints, divergence, bad input, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from piformer import train as train_mod
from piformer.checkpoint import load_model, load_trainer_state
from piformer.cli import main
from piformer.config import ModelConfig, TrainConfig, train_recipe
from piformer.data import prepare
from piformer.errors import RunInUseError
from piformer.model import PiGPT
from piformer.train import evaluate_run, lr_at, train, warmup_steps

# Small enough that a run of a dozen steps takes about a second on 2 CPU cores.
TINY_TRAIN = dict(max_steps=12, batch_size=8, micro_batch_size=4, lr=3e-3, eval_interval=4, eval_batches=2,
                  log_interval=3, checkpoint_interval=4, warmup=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare("builtin", d, vocab_size=300, max_files=20, progress=False)
    return d


def _cfgs(preset="SM+LN+G", model=None, **train_kw):
    return (ModelConfig.from_preset(preset, "tiny", **(model or {})),
            train_recipe("tiny", **{**TINY_TRAIN, **train_kw}))


def _steps(run_dir: Path) -> dict[int, dict]:
    """Per-step training records of a run (the last record of each step)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec:
            out[rec["step"]] = rec
    return out


def _evals(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("event") == "eval"}


# ---------------------------------------------------------------------------------------


def test_lr_schedule():
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup=0.05, schedule="linear")
    assert warmup_steps(cfg) == 5
    assert lr_at(0, cfg) == pytest.approx(0.2) and lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(5, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1 + 0.9 / 95)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(5, 99))
    cos = TrainConfig(max_steps=1000, lr=6e-4, min_lr=6e-6, warmup=200, schedule="cosine")
    assert warmup_steps(cos) == 200
    assert lr_at(200, cos) == pytest.approx(6e-4)
    assert lr_at(600, cos) == pytest.approx((6e-4 + 6e-6) / 2)
    assert lr_at(1000, cos) == pytest.approx(6e-6)


def test_no_weight_decay_on_gains_norms_temperatures_thresholds():
    model = PiGPT(ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", "tiny", norm="layernorm", weight_norm="qk"))
    decay, no_decay = model.optim_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    dec = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for key in ("temperature", "reg_threshold", "ffn_alpha", "ffn_beta", "ln_1", "ln_f", "bias", "original0"):
        assert any(key in n for n in nd), key
        assert not any(key in n for n in dec), key
    assert all(model.get_parameter(n).dim() == 2 for n in dec)
    assert "transformer.wte.weight" in dec


@pytest.mark.parametrize("preset,model", [("SM+LN+G", {"dropout": 0.1}), ("EReg(SM(t)+ScFuFFN)", {})])
def test_resume_matches_uninterrupted(tmp_path, data_dir, monkeypatch, preset, model):
    mcfg, tcfg = _cfgs(preset, model)
    full = train(mcfg, tcfg, data_dir, tmp_path / "full", progress=False)
    assert full["status"] == "finished" and full["step"] == 12

    real_lr_at = train_mod.lr_at

    def interrupt_at_step_7(step, cfg):  # Ctrl-C at the start of step 7: checkpoint at 4 exists
        if step == 6:
            raise KeyboardInterrupt
        return real_lr_at(step, cfg)

    monkeypatch.setattr(train_mod, "lr_at", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(mcfg, tcfg, data_dir, tmp_path / "cut", progress=False)
    assert json.loads((tmp_path / "cut" / "status.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    resumed = train(mcfg, tcfg, data_dir, tmp_path / "cut", resume=True, progress=False)

    a, b = _steps(tmp_path / "full"), _steps(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in a:  # same batches, same dropout masks, same optimizer state: identical numbers
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], abs=1e-6, rel=1e-6), s
        assert b[s]["lr"] == a[s]["lr"]
    assert _evals(tmp_path / "cut") == pytest.approx(_evals(tmp_path / "full"), abs=1e-6)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    wa = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)
    if preset.startswith("EReg"):
        rec = a[3]
        assert rec["reg"] is not None and len(rec["thresholds"]) == mcfg.n_layer
        assert set(rec["temperature"]) == {"mean", "std", "min", "max", "frac_nonpos"}
    rec = a[3]
    assert len(rec["head_entropy"]) == mcfg.n_layer and len(rec["head_entropy"][0]) == mcfg.n_head


def test_run_directory_layout(tmp_path, data_dir):
    mcfg, tcfg = _cfgs()
    r = train(mcfg, tcfg, data_dir, tmp_path / "run", preset="SM+LN+G", size="tiny", progress=False)
    run = tmp_path / "run"
    for which in ("last", "best"):
        assert sorted(os.listdir(run / "checkpoints" / which)) == ["config.json", "model.safetensors", "trainer_state.pt"]
    st = load_trainer_state(run / "checkpoints" / "last")
    assert st["step"] == 12 and "optimizer" in st and "rng" in st and st["data_position"]["step"] == 12
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "SM+LN+G" and cfg["model"]["vocab_size"] == json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 12
    assert status["best_val_loss"] == pytest.approx(min(_evals(run).values()))
    assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    ev = evaluate_run(run, max_batches=2, batch_size=4)
    assert ev["ppl"] == pytest.approx(math.exp(ev["val_loss"])) and ev["step"] == status["best_step"]


def _patch_training_loss(monkeypatch, change):
    """Route the loss of every training forward through change(call_number, model, loss)."""
    real_forward = PiGPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            out.loss = change(calls["n"], self, out.loss)
        return out

    monkeypatch.setattr(PiGPT, "forward", forward)


def test_forced_divergence_is_recorded_and_keeps_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    # 2 micro-steps per step: step 7 goes non-finite
    _patch_training_loss(monkeypatch, lambda n, model, loss: loss * float("nan") if n > 2 * 6 else loss)
    mcfg, tcfg = _cfgs()
    r = train(mcfg, tcfg, data_dir, tmp_path / "run", progress=False)
    assert r["status"] == "diverged" and r["diverged_at"] == 7 and r["last_checkpoint_step"] == 4
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "diverged" and status["diverged_at"] == 7 and status["step"] == 7
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "diverged" and lines[-1]["step"] == 7 and lines[-1]["loss"] is None
    assert load_trainer_state(tmp_path / "run" / "checkpoints" / "last")["step"] == 4
    model = load_model(tmp_path / "run", which="last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_gradient_under_a_finite_loss_stops_before_the_update(tmp_path, data_dir, monkeypatch):
    # step 5's first micro-step: a finite loss with an infinite gradient
    _patch_training_loss(monkeypatch, lambda n, model, loss:
                         loss + _inf_grad(model.transformer.wte.weight) if n == 2 * 4 + 1 else loss)
    mcfg, tcfg = _cfgs(checkpoint_interval=2, eval_interval=2)
    r = train(mcfg, tcfg, data_dir, tmp_path / "run", progress=False)
    assert r["status"] == "diverged" and r["diverged_at"] == 5 and r["last_checkpoint_step"] == 4
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "diverged" and lines[-1]["cause"] == "gradient" and lines[-1]["loss"] is not None
    for which in ("last", "best"):  # the update was never applied: every checkpoint is finite
        model = load_model(tmp_path / "run", which=which)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def _inf_grad(w: torch.Tensor) -> torch.Tensor:
    """A term worth 0 in the forward whose gradient with respect to w is infinite."""

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.new_zeros(())

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(w, float("inf"))

    return InfGrad.apply(w)


def test_real_divergence_cli_exit_code(tmp_path, data_dir, capsys):
    rc = main(["train", "--preset", "SM", "--size", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "r"),
               "--quiet", "--set", "train.lr=1e4", "--set", "train.grad_clip=0", "--set", "train.warmup=0"])
    assert rc == train_mod.EXIT_DIVERGED == 3
    assert "diverged at step" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "status.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("args,match", [
    (["--preset", "NOPE"], "unknown preset 'NOPE'"),
    (["--size", "huge"], "unknown size 'huge'"),
    (["--set", "model.n_layers=3"], "unknown model field 'n_layers'"),
    (["--set", "lrr=1"], "unknown config key"),
    (["--set", "train.lr=fast"], "cannot read 'fast' as float"),
    (["--set", "model.block_size=100000"], "block_size=100000 is too long"),
    (["--set", "model.vocab_size=10"], "comes from the data"),
    (["--set", "train.batch_size=6", "--set", "train.micro_batch_size=4"], "must be a multiple"),
    (["--resume"], "holds no run"),
])
def test_bad_input_fails_fast(tmp_path, data_dir, capsys, args, match):
    out = tmp_path / "run"
    rc = main(["train", "--size", "tiny", "--data", str(data_dir), "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1
    assert not (out / "checkpoints").exists()


def test_missing_data_and_existing_run(tmp_path, data_dir, capsys):
    assert main(["train", "--size", "tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "piformer data prepare" in capsys.readouterr().err
    args = ["train", "--size", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "r2"), "--quiet",
            "--set", "train.max_steps=2"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "r2"), "--json", "--batches", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert main(["eval", str(tmp_path / "nothing")]) == 2


# ---------------------------------------------------------------------------------------
# Kill -9 while a checkpoint is being written


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from piformer import checkpoint
    from piformer.config import ModelConfig, train_recipe
    from piformer.train import train

    data, out, marker, where = sys.argv[1:5]
    real_save_file, real_torch_save = checkpoint.save_file, torch.save
    saves = {"n": 0}

    def stall(path):
        Path(path).write_bytes(b"half a file")  # a torn write...
        Path(marker).write_text("now")          # ...and the parent kills us here
        time.sleep(120)

    def save_file(tensors, path, metadata=None):
        saves["n"] += 1
        if saves["n"] == 2 and where == "weights":
            stall(path)
        return real_save_file(tensors, path, metadata=metadata)

    def torch_save(obj, f, *a, **k):
        if saves["n"] == 2 and where == "state":
            stall(f)
        return real_torch_save(obj, f, *a, **k)

    checkpoint.save_file = save_file
    torch.save = torch_save
    train(ModelConfig.from_preset("SM+LN+G", "tiny"),
          train_recipe("tiny", max_steps=12, batch_size=8, micro_batch_size=4, lr=3e-3, eval_interval=100,
                       eval_batches=2, log_interval=3, checkpoint_interval=4, warmup=2),
          data, out, progress=False)
""")


@pytest.mark.parametrize("where", ["weights", "state"])
def test_sigkill_during_checkpoint_leaves_previous_loadable(tmp_path, data_dir, where):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    marker, out = tmp_path / "marker", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(data_dir), str(out), str(marker), where])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "training exited before the second checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The step-8 checkpoint was being written; the step-4 one must still load, weights and state.
    model = load_model(out, which="last")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert load_trainer_state(out / "checkpoints" / "last")["step"] == 4
    # ...and the run resumes from it to the same place as a run that was never killed.
    mcfg, tcfg = _cfgs(eval_interval=100)
    resumed = train(mcfg, tcfg, data_dir, out, resume=True, progress=False)
    clean = train(mcfg, tcfg, data_dir, tmp_path / "clean", progress=False)
    assert resumed["step"] == 12 and resumed["val_loss"] == pytest.approx(clean["val_loss"], abs=1e-6)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo) under torchrun, against one process accumulating the same batch


def test_ddp_two_processes_match_single_process(tmp_path, data_dir):
    script = tmp_path / "cli.py"
    script.write_text("import sys\nfrom piformer.cli import main\nsys.exit(main())\n")
    sets = ["--set", "train.max_steps=6", "--set", "train.eval_interval=3", "--set", "train.checkpoint_interval=3"]
    common = ["train", "--size", "tiny", "--data", str(data_dir), "--quiet",
              "--set", "train.batch_size=8", "--set", "train.micro_batch_size=4", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), *common, "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["grad_accum"] == 1
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "one")]) == 0  # 1 process, 2 accumulation micro-steps
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    a, b = _steps(tmp_path / "ddp"), _steps(tmp_path / "one")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:  # same global batch, gradients averaged the same way (up to float summation order)
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-4), s
    assert _evals(tmp_path / "ddp") == pytest.approx(_evals(tmp_path / "one"), rel=1e-4)
    assert json.loads((tmp_path / "ddp" / "status.json").read_text())["status"] == "finished"


def test_regulariser_telemetry_in_a_fresh_run(tmp_path, data_dir):
    """A user can see in metrics.jsonl whether the regulariser acts: its weighted share of the
    loss, the share of rows outside the tolerance band, thresholds and temperatures per layer,
    and (every reg_grad_interval steps) its gradient against the cross-entropy's."""
    mcfg, tcfg = _cfgs("EReg(SM(t)+ScFuFFN)", reg_grad_interval=4)
    train(mcfg, tcfg, data_dir, tmp_path / "run", progress=False)
    steps = _steps(tmp_path / "run")
    L = mcfg.n_layer
    for s, rec in steps.items():
        assert rec["reg"] > 0 and 0 <= rec["reg_outside"] <= 1
        assert rec["reg_weighted"] == pytest.approx(tcfg.reg_lambda * rec["reg"])
        assert rec["reg_share"] == pytest.approx(rec["reg_weighted"] / rec["loss"])
    logged = steps[3]
    assert len(logged["threshold_stats"]["mean"]) == len(logged["threshold_stats"]["std"]) == L
    t = logged["temperature"]
    assert len(t["frac_nonpos"]) == L and all(f == 0.0 for f in t["frac_nonpos"])  # exp: t > 0
    assert all(0 < lo <= hi for lo, hi in zip(t["min"], t["max"]))
    ratios = {s: r["reg_grad_ratio"] for s, r in steps.items() if "reg_grad_ratio" in r}
    assert sorted(ratios) == [4, 8, 12] and all(v > 0 and math.isfinite(v) for v in ratios.values())
    # the twin logs no regulariser fields
    mcfg, tcfg = _cfgs("SM(t)+ScFuFFN")
    train(mcfg, tcfg, data_dir, tmp_path / "twin", progress=False)
    twin = _steps(tmp_path / "twin")[3]
    assert twin["reg"] is None and "reg_outside" not in twin and "thresholds" not in twin


def test_regulariser_settings_are_training_settings_a_resume_may_change(tmp_path, data_dir):
    mcfg, tcfg = _cfgs("EReg(SM(t)+ScFuFFN)", max_steps=4)
    train(mcfg, tcfg, data_dir, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "checkpoints" / "last" / "config.json").read_text())
    assert not any(k.startswith("reg_") and k != "reg_threshold_init" for k in saved)  # the network only
    more = train_recipe("tiny", **{**TINY_TRAIN, "max_steps": 8, "reg_lambda": 1e-2})
    r = train(mcfg, more, data_dir, tmp_path / "run", resume=True, progress=False)
    assert r["status"] == "finished"
    last = _steps(tmp_path / "run")[8]
    assert last["reg_weighted"] == pytest.approx(1e-2 * last["reg"])


def test_checkpoints_written_before_the_loss_settings_moved_still_load(tmp_path):
    from piformer.checkpoint import save_checkpoint

    old = ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", "tiny", temperature_param="raw")
    model = PiGPT(old)
    save_checkpoint(tmp_path / "ck", model, {"step": 0})
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    del cfg["temperature_param"]
    cfg.update(reg_lambda=1e-5, reg_gamma=0.2, reg_mode="head")  # the old layout
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    back = load_model(tmp_path / "ck")
    assert back.config.temperature_param == "raw"
    idx = torch.randint(0, old.vocab_size, (1, 8))
    torch.testing.assert_close(back(idx).logits, model(idx).logits)


def test_tensorboard_gets_the_regulariser_and_per_layer_statistics():
    rec = {"step": 5, "loss": 4.0, "reg": None, "reg_grad_ratio": 0.1, "grad_norm": float("nan"),
           "threshold_stats": {"mean": [0.5, 0.6], "std": [0.01, 0.02]},
           "temperature": {"min": [0.01, -0.002], "frac_nonpos": [0.0, 0.25]}, "head_entropy": [[1.0]]}
    got = dict(train_mod._scalars(rec))
    assert got["loss"] == 4.0 and got["reg_grad_ratio"] == 0.1 and "reg" not in got and "grad_norm" not in got
    assert got["threshold_stats/std/layer_1"] == 0.02 and got["temperature/frac_nonpos/layer_1"] == 0.25
    assert "step" not in got and not any(k.startswith("head_entropy") for k in got)


# ---------------------------------------------------------------------------------------
# Resume safety: the checkpoint must be the run's, the best is not forgotten, no metrics lost


def _interrupt_at(monkeypatch, step_index: int) -> None:
    """Ctrl-C at the start of the update with 0-based index `step_index`."""
    def interrupted(step, cfg):
        if step == step_index:
            raise KeyboardInterrupt
        return lr_at(step, cfg)

    monkeypatch.setattr(train_mod, "lr_at", interrupted)


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path, data_dir):
    from piformer.checkpoint import save_checkpoint

    mcfg, tcfg = _cfgs(max_steps=4)
    run = tmp_path / "run"
    train(mcfg, tcfg, data_dir, run, progress=False)
    ours = load_model(run, which="last").config
    stray = PiGPT(ModelConfig.from_dict({**ours.to_dict(), "n_layer": 3, "ffn_act": "relu"}))
    save_checkpoint(run / "checkpoints" / "last", stray, load_trainer_state(run / "checkpoints" / "last"))
    with pytest.raises(ValueError, match=r"describes a different model .*n_layer: 3 in the checkpoint, 2 in the run"
                                         r"; ffn_act: 'relu' in the checkpoint, 'gelu' in the run"):
        train(mcfg, train_recipe("tiny", **{**TINY_TRAIN, "max_steps": 8}), data_dir, run, resume=True, progress=False)


def test_resume_keeps_a_best_checkpoint_newer_than_last(tmp_path, data_dir, monkeypatch):
    # Evaluations at 2, 4, 6 and checkpoints at 4: interrupted in step 7, the best (6) is newer than last (4).
    mcfg, tcfg = _cfgs(eval_interval=2)
    run = tmp_path / "run"
    _interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(mcfg, tcfg, data_dir, run, progress=False)
    best = load_trainer_state(run / "checkpoints" / "best")
    last = load_trainer_state(run / "checkpoints" / "last")
    assert (last["step"], best["best_step"]) == (4, 6) and best["best_val_loss"] < last["best_val_loss"]
    _interrupt_at(monkeypatch, 4)  # the resumed run's first update
    with pytest.raises(KeyboardInterrupt):
        train(mcfg, tcfg, data_dir, run, resume=True, progress=False)
    status = json.loads((run / "status.json").read_text())
    assert (status["best_step"], status["best_val_loss"]) == (6, best["best_val_loss"])
    monkeypatch.setattr(train_mod, "lr_at", lr_at)
    r = train(mcfg, tcfg, data_dir, run, resume=True, progress=False)
    assert r["best_val_loss"] == min(_evals(run).values())
    assert load_trainer_state(run / "checkpoints" / "best")["best_val_loss"] == r["best_val_loss"]


def test_metrics_reach_the_file_before_each_checkpoint(tmp_path, data_dir, monkeypatch):
    """A kill right after a checkpoint at step s must leave metrics lines 1..s on disk (a resume
    keeps exactly those). Checkpoints at 4 and 8 fall between log flushes (every 3 steps)."""
    from piformer import checkpoint

    run = tmp_path / "run"
    seen = {}
    real_save = checkpoint.save_checkpoint

    def save_checkpoint(ckpt_dir, model, trainer_state=None):
        on_disk = set()
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line: what a kill here would leave
            if "event" not in rec:
                on_disk.add(rec["step"])
        seen[trainer_state["step"]] = on_disk
        return real_save(ckpt_dir, model, trainer_state)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_checkpoint)
    mcfg, tcfg = _cfgs(eval_interval=100)
    train(mcfg, tcfg, data_dir, run, progress=False)
    assert sorted(seen) == [4, 8, 12]
    for step, steps in seen.items():
        assert steps == set(range(1, step + 1)), step


# ---------------------------------------------------------------------------------------
# Files for people: modes follow the umask


def _modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else ""): oct(p.stat().st_mode & 0o777)
            for p in sorted(root.rglob("*"))}


def test_everything_written_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        data = tmp_path / "data"
        prepare("builtin", data, vocab_size=300, max_files=20, progress=False)
        mcfg, tcfg = _cfgs(max_steps=4, eval_interval=2, checkpoint_interval=2)
        train(mcfg, tcfg, data, tmp_path / "run", progress=False)
        more = train_recipe("tiny", **{**TINY_TRAIN, "max_steps": 6, "eval_interval": 2, "checkpoint_interval": 2})
        train(mcfg, more, data, tmp_path / "run", resume=True, progress=False)  # rewrites metrics.jsonl
    finally:
        os.umask(old)
    modes = _modes(tmp_path)
    assert {"data/meta.json", "data/tokenizer.json", "data/train.bin", "run/.lock", "run/metrics.jsonl",
            "run/checkpoints/best/", "run/checkpoints/last/model.safetensors"} <= set(modes)
    wrong = {p: m for p, m in modes.items() if m != ("0o755" if p.endswith("/") else "0o644")}
    assert not wrong


@pytest.mark.parametrize("umask", [0o077, 0o027, 0o002], ids=oct)
def test_atomic_writes_take_their_modes_from_the_umask(tmp_path, umask):
    from piformer.checkpoint import save_checkpoint
    from piformer.fileio import atomic_write_text, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "a" / "status.json", "{}\n")
        save_checkpoint(tmp_path / "ck", PiGPT(ModelConfig.from_preset("SM", "tiny")), {"step": 1})
    finally:
        os.umask(old)
    modes = _modes(tmp_path)
    assert modes == {p: oct((0o777 if p.endswith("/") else 0o666) & ~umask) for p in modes}, modes


# ---------------------------------------------------------------------------------------
# A run directory has one writer


def test_a_second_train_into_a_running_directory_fails_at_once(tmp_path, data_dir, monkeypatch, capsys):
    import socket

    mcfg, tcfg = _cfgs(max_steps=4)
    run = tmp_path / "run"
    real_lr_at = train_mod.lr_at
    refused = []

    def lr_at(step, cfg):
        if step == 2:  # while the first run trains: a fresh start, and a --resume through the CLI
            with pytest.raises(RunInUseError) as err:
                train(mcfg, tcfg, data_dir, run, progress=False)
            refused.append(str(err.value))
            refused.append(main(["train", "--data", str(data_dir), "--out", str(run), "--resume", "--quiet"]))
            refused.append(capsys.readouterr().err)
        return real_lr_at(step, cfg)

    monkeypatch.setattr(train_mod, "lr_at", lr_at)
    r = train(mcfg, tcfg, data_dir, run, progress=False)
    assert r["status"] == "finished" and r["step"] == 4  # the first run was not disturbed
    message, rc, err = refused
    assert f"is being trained by another process (pid {os.getpid()} on host {socket.gethostname()}" in message
    assert rc == 75 and f"pid {os.getpid()}" in err  # a lost race, not bad input
    assert not (run / ".lock.holder").exists()  # released when train() returned
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    more = train_recipe("tiny", **{**TINY_TRAIN, "max_steps": 6})
    assert train(mcfg, more, data_dir, run, resume=True, progress=False)["step"] == 6


_HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from piformer.train import _lock_run_dir

    held = _lock_run_dir(Path(sys.argv[1]))  # kept: a lock object that is collected is released
    print("holding", flush=True)
    time.sleep(120)
""")


def test_a_lock_held_elsewhere_refuses_and_dies_with_its_holder(tmp_path, data_dir):
    mcfg, tcfg = _cfgs(max_steps=4)
    run = tmp_path / "run"
    train(mcfg, tcfg, data_dir, run, progress=False)
    script = tmp_path / "hold.py"
    script.write_text(_HOLD_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "holding"
        more = train_recipe("tiny", **{**TINY_TRAIN, "max_steps": 8})
        for resume in (True, False):
            with pytest.raises(RunInUseError, match=f"another process \\(pid {proc.pid} on host "):
                train(mcfg, more, data_dir, run, resume=resume, progress=False)
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert json.loads((run / ".lock.holder").read_text())["pid"] == proc.pid  # stale, and harmless
    r = train(mcfg, more, data_dir, run, resume=True, progress=False)
    assert r["status"] == "finished" and r["step"] == 8 and not (run / ".lock.holder").exists()


def test_resume_check_names_the_differing_fields_of_a_legacy_run_config():
    """A run written before the loss settings left ModelConfig still gets a one-line refusal
    naming the field that differs (not an AttributeError on the dropped reg_* keys)."""
    old = ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", "tiny", temperature_param="raw").to_dict()
    saved = {"model": {**old, "reg_lambda": 1e-5, "reg_gamma": 0.2, "reg_mode": "head"}}
    del saved["model"]["temperature_param"]
    now = ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", "tiny", temperature_param="raw", n_layer=3)
    with pytest.raises(ValueError, match=r"n_layer: 2 -> 3"):
        train_mod._check_resume_compatible(saved, now, {})
