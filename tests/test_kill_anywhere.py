"""Kill anywhere, lose nothing: SIGKILL at several moments of training (and of a study), resume,
and the run's every file of record equals an uninterrupted run's.

The child process stops itself at the chosen moment (it writes a marker and sleeps); the parent
then kills it with SIGKILL, so no handler or `finally` runs, as after an OOM kill or a lost node.
"""

from __future__ import annotations

import json
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

from piformer.config import ModelConfig, train_recipe
from piformer.data import prepare
from piformer.train import train

# log_interval 3 does not divide checkpoint_interval 4: a checkpoint lands between flushes.
RECIPE = dict(max_steps=12, batch_size=8, micro_batch_size=4, lr=3e-3, eval_interval=4, eval_batches=2,
              log_interval=3, checkpoint_interval=4, warmup=2)
TIMING_KEYS = {"tokens_per_s"}

_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from piformer import checkpoint, train as train_mod
    from piformer.config import ModelConfig, train_recipe

    data, out, marker, point, recipe = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], eval(sys.argv[5])
    calls = {"lr": 0, "eval": 0, "weights": 0, "save": 0}

    def stop_here():
        marker.write_text(point)
        time.sleep(300)  # the parent kills us now

    real_lr_at, real_evaluate = train_mod.lr_at, train_mod.evaluate
    real_save_file, real_save_checkpoint = checkpoint.save_file, checkpoint.save_checkpoint

    def lr_at(step, cfg):
        if point == "between steps" and step == 6:
            stop_here()
        return real_lr_at(step, cfg)

    def evaluate(*a, **k):
        calls["eval"] += 1
        if point == "during evaluation" and calls["eval"] == 2:
            stop_here()
        return real_evaluate(*a, **k)

    def save_file(tensors, path, metadata=None):
        if point == "during a checkpoint write" and "last" in str(path):
            calls["weights"] += 1
            if calls["weights"] == 2:
                Path(path).write_bytes(b"half a file")
                stop_here()
        return real_save_file(tensors, path, metadata=metadata)

    def save_checkpoint(ckpt_dir, *a, **k):
        done = real_save_checkpoint(ckpt_dir, *a, **k)
        if point == "just after a checkpoint" and Path(ckpt_dir).name == "last":
            calls["save"] += 1
            if calls["save"] == 2:
                stop_here()
        return done

    train_mod.lr_at, train_mod.evaluate = lr_at, evaluate
    checkpoint.save_file, checkpoint.save_checkpoint = save_file, save_checkpoint
    train_mod.train(ModelConfig.from_preset("SM+LN+G", "tiny"), train_recipe("tiny", **recipe), data, out,
                    progress=False)
    sys.exit(7)  # the moment never came
""")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare("builtin", d, vocab_size=300, max_files=20, progress=False)
    return d


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("clean") / "run"
    train(ModelConfig.from_preset("SM+LN+G", "tiny"), train_recipe("tiny", **RECIPE), data_dir, out, progress=False)
    return out


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without timings and without the 'resume' markers a resumed run adds."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") != "resume":
            out.append({k: v for k, v in rec.items() if k not in TIMING_KEYS})
    return out


def _kill_when_it_stops(script: str, args: list[str], marker: Path, point: str, tmp_path: Path,
                        timeout: float) -> None:
    """Run `script` with `args`, wait for it to write `marker` (it then sleeps), SIGKILL it."""
    path = tmp_path / "child.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        deadline = time.time() + timeout
        while not marker.exists():
            assert proc.poll() is None, f"the child ended (exit {proc.returncode}) before '{point}'"
            assert time.time() < deadline, f"'{point}' never came"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()


def _kill_at(point: str, data_dir: Path, out: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _kill_when_it_stops(_CHILD, [str(data_dir), str(out), str(marker), point, repr(RECIPE)], marker, point,
                        tmp_path, timeout=180)


def _assert_same_run(resumed: Path, clean: Path) -> None:
    _assert_same_run_files(resumed, clean, steps=RECIPE["max_steps"])


def _assert_same_run_files(resumed: Path, clean: Path, steps: int) -> None:
    a, b = _records(clean), _records(resumed)
    assert [(r["step"], r.get("event")) for r in b] == [(r["step"], r.get("event")) for r in a]
    for ra, rb in zip(a, b):  # every line, every number: the same batches and the same updates
        assert _close(ra, rb), (ra, rb)
    sa, sb = (json.loads((r / "status.json").read_text()) for r in (clean, resumed))
    assert sb["status"] == "finished" and sb["step"] == steps
    assert sb["best_val_loss"] == pytest.approx(sa["best_val_loss"], abs=1e-7)
    assert sb["best_step"] == sa["best_step"]
    for which in ("best", "last"):
        wa = load_file(str(clean / "checkpoints" / which / "model.safetensors"))
        wb = load_file(str(resumed / "checkpoints" / which / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)
    assert not [p for p in (resumed / "checkpoints").iterdir() if p.name.startswith(".")]  # no litter


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return b == pytest.approx(a, rel=1e-6, abs=1e-6)
    return a == b


@pytest.mark.parametrize("point", ["between steps", "during a checkpoint write", "during evaluation",
                                   "just after a checkpoint"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, data_dir, uninterrupted, point):
    out = tmp_path / "run"
    _kill_at(point, data_dir, out, tmp_path)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "running"  # what a SIGKILL leaves: no handler ran
    r = train(ModelConfig.from_preset("SM+LN+G", "tiny"), train_recipe("tiny", **RECIPE), data_dir, out,
              resume=True, progress=False)
    assert r["status"] == "finished"
    _assert_same_run(out, uninterrupted)


# ---------------------------------------------------------------------------------------
# A study killed between (and inside) its stages, then rerun


STUDY = dict(
    name="killed", note="test", size="tiny",
    train={"max_steps": 6, "batch_size": 8, "micro_batch_size": 8, "eval_interval": 3, "eval_batches": 2,
           "log_interval": 2, "checkpoint_interval": 3},
    data={"source": "builtin", "max_bytes": 150_000, "vocab_size": 300},
    presets=("SM+LN+G", "SM+ScFuFFN"), jobs=1, secure_presets=(), entropy_batches=2, eval_batches=2, smoke=True,
)

_STUDY_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from piformer import reproduce as rp, train as train_mod

    out, marker, point, study = sys.argv[1], Path(sys.argv[2]), sys.argv[3], eval(sys.argv[4])
    calls = {"entropy": 0, "train": 0}

    def stop_here():
        marker.write_text(point)
        time.sleep(300)

    real_entropy, real_train, real_lr_at = rp._entropy_stage, train_mod.train, train_mod.lr_at

    def entropy_stage(*a, **k):
        calls["entropy"] += 1
        if point == "between stages" and calls["entropy"] == 2:
            stop_here()  # run 1 is analysed, run 2 trained and evaluated
        return real_entropy(*a, **k)

    def train(*a, **k):
        calls["train"] += 1
        return real_train(*a, **k)

    def lr_at(step, cfg):
        if point == "inside a run" and calls["train"] == 2 and step == 4:
            stop_here()  # the second run has its step-3 checkpoint
        return real_lr_at(step, cfg)

    rp._entropy_stage, train_mod.train, train_mod.lr_at = entropy_stage, train, lr_at
    rp.reproduce(rp.Tier(**study), out, secure=False)
    sys.exit(7)
""")


@pytest.fixture(scope="module")
def clean_study(tmp_path_factory):
    from piformer.reproduce import Tier, reproduce

    out = tmp_path_factory.mktemp("clean_study")
    reproduce(Tier(**STUDY), out, secure=False)
    return out


@pytest.mark.parametrize("point", ["between stages", "inside a run"])
def test_a_study_killed_and_rerun_equals_the_uninterrupted_study(tmp_path, clean_study, point):
    from piformer.reproduce import Tier, reproduce, slug

    out, marker = tmp_path / "study", tmp_path / "marker"
    _kill_when_it_stops(_STUDY_CHILD, [str(out), str(marker), point, repr(STUDY)], marker, point, tmp_path,
                        timeout=300)
    assert not (out / "report.md").exists()
    reproduce(Tier(**STUDY), out, secure=False)
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    for preset in STUDY["presets"]:
        a, b = clean_study / "runs" / slug(preset), out / "runs" / slug(preset)
        _assert_same_run_files(b, a, steps=STUDY["train"]["max_steps"])
        ea, eb = (json.loads((r / "eval.json").read_text()) for r in (a, b))
        assert eb["val_loss"] == pytest.approx(ea["val_loss"], abs=1e-6)
        ha, hb = (json.loads((r / "entropy.json").read_text()) for r in (a, b))
        assert ha["head_entropy"] and _close(ha["head_entropy"], hb["head_entropy"])
