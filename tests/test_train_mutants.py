"""What the (sampled) mutation run of `train.py` showed no test would notice: callbacks told
the run has started, status.json's step after an evaluation and its last checkpoint after a
divergence, the recorded error of a failed run, the trainer state's and run config's keys, the
progress bar, and the regulariser's gradient ratio when the language-modelling gradient is 0."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from piformer.checkpoint import load_trainer_state
from piformer.config import ModelConfig, train_recipe
from piformer.train import _progress_bar, reg_grad_ratio, train
from tiny_runs import prepared_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_data(tmp_path_factory.mktemp("data"))


def _recipe(**kw):
    base = dict(max_steps=4, eval_interval=2, checkpoint_interval=100, log_interval=1, warmup=1, batch_size=4,
                micro_batch_size=4, lr=1e-2, eval_batches=2, beta2=0.95, eps=1e-7)  # not torch's defaults
    return train_recipe("tiny", **{**base, **kw})


class Recorder:
    def __init__(self, run_dir: Path):
        self.run_dir, self.started, self.status_at_log = run_dir, [], {}

    def on_train_start(self, run_dir):
        self.started.append(Path(run_dir))

    def on_log(self, step, metrics):
        self.status_at_log[step] = json.loads((self.run_dir / "status.json").read_text())


def test_callbacks_hear_the_start_and_status_follows_each_evaluation(tmp_path, data):
    out = tmp_path / "run"
    rec = Recorder(out)
    train(ModelConfig.from_preset("SM+LN+G", "tiny"), _recipe(), data, out, progress=False, callbacks=[rec])
    assert rec.started == [out]
    # the evaluation at step 2 wrote its step, loss and best into status.json before step 3's log line
    at3 = rec.status_at_log[3]
    assert at3["step"] == 2 and at3["best_step"] == 2 and math.isfinite(at3["last_val_loss"])

    state = load_trainer_state(out)
    assert state["scheduler"]["kind"] == _recipe().schedule
    assert state["data_position"]["rule"] == "batch(seed, step, rank*accum+micro)"
    run_cfg = json.loads((out / "config.json").read_text())
    assert run_cfg["world_size"] == 1 and run_cfg["grad_accum"] == 1
    recipe = _recipe()
    groups = state["optimizer"]["param_groups"]
    assert {tuple(g["betas"]) for g in groups} == {(recipe.beta1, recipe.beta2)}
    assert {g["eps"] for g in groups} == {recipe.eps}
    # a tiny step takes milliseconds: throughput is tokens over the step's own seconds
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "tokens_per_s" in r]
    assert steps and all(r["tokens_per_s"] > state["tokens_seen"] / state["step"] for r in steps)


def test_training_without_clipping_is_not_a_divergence(tmp_path, data):
    """grad_clip=0 means no clipping (and no gradient norm): the run trains to the end."""
    result = train(ModelConfig.from_preset("SM", "tiny"), _recipe(grad_clip=0.0), data, tmp_path / "run",
                   progress=False)
    assert result["status"] == "finished"


def test_only_torchrun_variables_make_a_distributed_run(monkeypatch):
    import piformer.train as tr

    started = []
    monkeypatch.setattr(tr.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(tr.dist, "init_process_group", lambda backend: started.append(backend))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # without RANK: not torchrun, a plain process
    assert tr._setup_dist("cpu").world == 1 and not started
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    d = tr._setup_dist("cpu")
    assert (d.rank, d.world, started) == (1, 2, ["gloo"])


def test_a_run_that_fails_records_the_error_by_type_and_message(tmp_path, data):
    class Boom:
        def on_log(self, step, metrics):
            if step == 2:
                raise RuntimeError("the disk went away")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the disk went away"):
        train(ModelConfig.from_preset("SM", "tiny"), _recipe(), data, out, progress=False, callbacks=[Boom()])
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "RuntimeError: the disk went away"


@pytest.mark.timeout(90)  # a divergence that goes unnoticed loops on the same step forever
def test_a_diverged_run_names_its_last_good_checkpoint(tmp_path, data):
    out = tmp_path / "run"
    result = train(ModelConfig.from_preset("SM", "tiny"), _recipe(lr=1e6, grad_clip=0.0, checkpoint_interval=1,
                                                                   max_steps=20), data, out, progress=False)
    assert result["status"] == "diverged"
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "diverged" and status["diverged_at"] >= 2
    assert status["last_checkpoint_step"] == status["diverged_at"] - 1


def test_the_progress_bar_counts_steps_from_where_the_run_is():
    t = SimpleNamespace(env=SimpleNamespace(d=SimpleNamespace(master=True)), cfg=SimpleNamespace(max_steps=50), step=7)
    bar = _progress_bar(t, "SM+LN+G")
    try:
        assert (bar.total, bar.n, bar.unit, bar.desc) == (50, 7, "step", "train SM+LN+G")
        assert bar.dynamic_ncols
    finally:
        bar.close()
    t.env.d.master = False
    assert _progress_bar(t, None) is None


def test_the_gradient_ratio_is_nan_when_the_language_model_gradient_is_zero():
    from piformer.config import RegLoss
    from piformer.model import PiGPT

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", "tiny")
    model = PiGPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied with wte: every logit is 0 whatever the pattern, no CE gradient
    r = reg_grad_ratio(model, x, x, RegLoss(lam=1.0))
    assert r["ce_grad_norm"] == 0.0 and r["reg_grad_norm"] > 0 and math.isnan(r["reg_grad_ratio"])
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)
    r = reg_grad_ratio(model, x, x, RegLoss(lam=1.0))
    assert r["reg_grad_ratio"] == pytest.approx(r["reg_grad_norm"] / r["ce_grad_norm"])


def test_the_result_and_the_log_lines_of_a_run(tmp_path, data, capsys):
    out = tmp_path / "run"
    cfg = ModelConfig.from_preset("SM", "tiny")
    result = train(cfg, _recipe(log_interval=3), data, out, progress=True, preset="SM")
    assert result["run_dir"] == str(out) and result["world_size"] == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # every step has a line; the full ones (entropies, weight stats) every log_interval and at the end
    assert [r["step"] for r in lines if "head_entropy" in r] == [3, 4]
    tokens = 4 * 4 * cfg.block_size  # steps x batch x T
    assert result["tokens_per_s"] >= tokens / result["seconds"]  # tokens over the loop's own time
    assert result["tokens_per_s"] <= max(r["tokens_per_s"] for r in lines if "tokens_per_s" in r)
    err = capsys.readouterr().err
    assert "train SM" in err and re.search(r"tok_s=\d+", err)  # the progress bar, with its throughput

    again = train(cfg, _recipe(log_interval=3), data, out, resume=True, progress=False)
    assert again["status"] == "finished" and again["tokens_per_s"] is None  # nothing left to train


@pytest.mark.timeout(90)  # a divergence that goes unnoticed loops on the same step forever
def test_a_run_that_diverges_before_any_checkpoint_says_it_has_none(tmp_path, data):
    out = tmp_path / "run"
    result = train(ModelConfig.from_preset("SM", "tiny"), _recipe(lr=1e6, grad_clip=0.0, max_steps=20), data, out,
                   progress=False)
    assert result["status"] == "diverged"
    status = json.loads((out / "status.json").read_text())
    assert "last_checkpoint_step" in status and status["last_checkpoint_step"] is None
    assert not (out / "checkpoints" / "last").exists()
