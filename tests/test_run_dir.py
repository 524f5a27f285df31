"""piformer.run_dir: the one owner of a run directory's layout, records, resume merge and lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from piformer import run_dir as rd
from piformer.config import ModelConfig, TrainConfig, parse_overrides
from piformer.errors import RunInUseError


def _saved_run(root, data_dir, preset="SM+LN+G", **train):
    """A run directory holding only config.json, as train() writes it."""
    run = root / "run"
    run.mkdir()
    model = ModelConfig.from_preset(preset, "tiny", vocab_size=300)
    rd.write_config(run, {"preset": preset, "size": "tiny", "model": model.to_dict(),
                          "train": TrainConfig(**train).to_dict(), "data": {"dir": str(data_dir)}})
    return run, model


def test_the_layout_is_named_in_one_place(tmp_path):
    assert rd.checkpoint_dir(tmp_path, rd.BEST) == tmp_path / "checkpoints" / "best"
    assert rd.checkpoint_dir(tmp_path, rd.LAST) == tmp_path / "checkpoints" / "last"
    names = [rd.CONFIG, rd.STATUS, rd.METRICS, rd.EVAL, rd.ENTROPY, rd.PI_COST, rd.PI_COST_GPT2, rd.PI_SECURE,
             rd.LOCK_FILE, rd.LOCK_HOLDER, rd.METRICS_PREVIOUS, rd.TENSORBOARD, rd.CHECKPOINTS]
    assert len(set(names)) == len(names)
    # the old import paths name the same files
    from piformer import train
    from piformer.analysis import runs

    assert (train.LOCK_FILE, train.LOCK_HOLDER) == (rd.LOCK_FILE, rd.LOCK_HOLDER)
    assert (runs.METRICS, runs.STATUS, runs.RUN_CONFIG, runs.RESULT_FILE) == (rd.METRICS, rd.STATUS, rd.CONFIG, rd.ENTROPY)
    assert train._lock_run_dir is rd.lock and train._unlock_run_dir is rd.unlock


def test_status_reads_as_empty_when_absent_or_torn(tmp_path):
    assert rd.read_status(tmp_path) == {}
    (tmp_path / rd.STATUS).write_text('{"status": "runn')  # killed mid-write (atomic writes make this rare)
    assert rd.read_status(tmp_path) == {}
    rd.write_status(tmp_path, {"status": "finished", "step": 7})
    assert rd.read_status(tmp_path) == {"status": "finished", "step": 7}


def test_recorded_data_dir_resolves_relative_paths_and_older_layouts(tmp_path, monkeypatch):
    run = tmp_path / "study" / "run"
    (tmp_path / "study" / "data").mkdir(parents=True)
    run.mkdir()
    monkeypatch.chdir(tmp_path)
    assert rd.recorded_data_dir({"data": {"dir": "data"}}, run) == tmp_path / "study" / "data"  # beside the run
    assert rd.recorded_data_dir({"data": {"dir": "/abs/d"}}, run) == Path("/abs/d")
    assert rd.recorded_data_dir({"data_dir": "x"}) == Path("x")
    assert rd.recorded_data_dir({"train": {"data_dir": "y"}}) == Path("y")
    assert rd.recorded_data_dir({"model": {}}, run) is None
    # from the run directory itself: none recorded, or an unreadable config, is None
    assert rd.run_data_dir(run) is None
    (run / rd.CONFIG).write_text("{not json")
    assert rd.run_data_dir(run) is None
    rd.write_config(run, {"data": {"dir": str(tmp_path / "study" / "data")}})
    assert rd.run_data_dir(run) == tmp_path / "study" / "data"


def test_resume_merges_overrides_onto_the_saved_configs(tmp_path):
    run, model = _saved_run(tmp_path, tmp_path / "data", lr=1e-3, max_steps=10)
    over = parse_overrides(["train.max_steps=20", "model.dropout=0.1"])
    m, t, data_dir, preset, size = rd.resume_configs(run, over)
    assert (preset, size, data_dir) == ("SM+LN+G", "tiny", str(tmp_path / "data"))
    assert m == ModelConfig.from_saved({**model.to_dict(), "dropout": 0.1})
    assert t.max_steps == 20 and t.lr == 1e-3  # the override, and the saved value kept
    _, _, data_dir, *_ = rd.resume_configs(run, parse_overrides([]), data=str(tmp_path / "elsewhere"))
    assert data_dir == str(tmp_path / "elsewhere")


def test_resume_refuses_a_directory_without_a_run_or_a_data_record(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run \\(no config.json\\); start it without --resume"):
        rd.resume_configs(tmp_path, parse_overrides([]))
    rd.write_config(tmp_path, {"model": {}, "train": {}})
    with pytest.raises(ValueError, match="records no data directory; pass --data"):
        rd.resume_configs(tmp_path, parse_overrides([]))


_HOLD = textwrap.dedent("""
    import sys, time
    from piformer import run_dir
    held = run_dir.lock(sys.argv[1])
    print("holding", flush=True)
    time.sleep(60)
""")


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(RunInUseError, match=f"being trained by another process \\(pid {proc.pid} on host "):
            rd.lock(run)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    held = rd.lock(run)  # the kernel dropped the dead holder's lock
    assert json.loads((run / rd.LOCK_HOLDER).read_text())["pid"] == os.getpid()
    rd.unlock(run, held)
    assert not (run / rd.LOCK_HOLDER).exists()
    rd.unlock(run, rd.lock(run))  # and it can be taken again
