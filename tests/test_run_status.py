"""status.json always tells the truth, and a corrected retry needs no manual clean-up.
Shards are checked against the hashes meta.json recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from piformer.cli import main
from piformer.data import TokenData, prepare
from piformer.data import shards as shards_mod
from piformer.data.shards import full_digest, sample_digest

TINY = ["--size", "tiny", "--quiet", "--set", "train.max_steps=6", "--set", "train.eval_interval=3",
        "--set", "train.checkpoint_interval=3", "--set", "train.eval_batches=1", "--set", "train.batch_size=4",
        "--set", "train.micro_batch_size=4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare("builtin", d, vocab_size=300, max_files=20, progress=False)
    return d


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _with_ids_outside_the_vocabulary(src: Path, dst: Path) -> Path:
    """A copy whose train shard holds id 5000 (vocabulary 300) and whose meta.json agrees with
    its bytes: only the per-batch check can tell."""
    import shutil

    shutil.copytree(src, dst)
    ids = np.fromfile(dst / "train.bin", dtype="<u2")
    ids[:] = 5000
    ids.tofile(dst / "train.bin")
    meta = json.loads((dst / "meta.json").read_text())
    meta["splits"]["train"].update(sha256=full_digest(dst / "train.bin"), sample_sha256=sample_digest(dst / "train.bin"))
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_a_start_that_fails_after_set_up_says_so_and_a_corrected_retry_starts_over(tmp_path, data_dir, capsys):
    bad = _with_ids_outside_the_vocabulary(data_dir, tmp_path / "bad_data")
    run = tmp_path / "run"
    rc = main(["train", "--data", str(bad), "--out", str(run), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "token id 5000" in err and "vocabulary of 300" in err
    status = _status(run)
    assert status["status"] == "failed" and "token id 5000" in status["error"]
    # The same command on good data: no --resume, no rm -rf.
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY]) == 0
    status = _status(run)
    assert status["status"] == "finished" and status["step"] == 6 and status["error"] is None
    assert "starting over" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["data"]["dir"] == str(data_dir.resolve())


def test_a_finished_run_is_never_started_over(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY]) == 0
    before = (run / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "checkpoints" / "last" / "model.safetensors").read_bytes() == before


def test_sigterm_records_terminated_exits_143_and_the_run_resumes(tmp_path, data_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "piformer.cli", "train", "--data", str(data_dir), "--out", str(run), *TINY,
           "--set", "train.max_steps=400", "--set", "train.log_interval=1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last").is_dir():  # past its first checkpoint
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert rc == 143, err
    assert "terminated" in err and "Traceback" not in err
    status = _status(run)
    assert status["status"] == "terminated" and 3 <= status["step"] < 400
    assert not (run / ".lock.holder").exists()  # released on the way out
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--set", "train.max_steps=9"]) == 0
    assert _status(run)["status"] == "finished" and _status(run)["step"] == 9


# ---------------------------------------------------------------------------------------
# Shard integrity


def test_prepare_records_both_hashes_and_open_checks_them(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        assert meta["splits"][split]["sha256"] == full_digest(path)
        assert meta["splits"][split]["sample_sha256"] == sample_digest(path)
    TokenData(data_dir, verify="full")


def test_one_changed_byte_is_found_by_the_full_check_and_a_sampled_one_by_the_fast_check(tmp_path, data_dir,
                                                                                           monkeypatch):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    path = d / "train.bin"
    size = path.stat().st_size
    offsets = shards_mod._sample_offsets(size)
    assert len(offsets) > 1, "the shard must be larger than the sample for this test"
    unsampled = offsets[1] - 10  # between the first two sampled blocks
    sampled = offsets[5] + 7

    def flip(at: int) -> None:
        b = bytearray(path.read_bytes())
        b[at] ^= 0xFF
        path.write_bytes(bytes(b))

    monkeypatch.setattr(shards_mod, "_FULL_HASH_UNDER", 0)  # as if the shard were large: sampled on open
    flip(unsampled)
    TokenData(d)  # the sample cannot see this byte...
    with pytest.raises(ValueError, match="train.bin.*corrupted.*sha256"):
        TokenData(d, verify="full")  # ...the full check can
    flip(unsampled)
    flip(sampled)
    with pytest.raises(ValueError, match="train.bin.*corrupted.*sampled hash"):
        TokenData(d)
    monkeypatch.setattr(shards_mod, "_FULL_HASH_UNDER", 64 << 20)
    flip(sampled)
    flip(unsampled)
    with pytest.raises(ValueError, match="corrupted.*sha256"):
        TokenData(d)  # small shards are hashed whole on every open
    TokenData(d, verify="none")  # sizes only, when asked


def test_data_verify_command(tmp_path, data_dir, capsys):
    assert main(["data", "verify", str(data_dir)]) == 0
    assert "sha256 of every byte" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown verify mode 'some'"):
        TokenData(data_dir, verify="some")
