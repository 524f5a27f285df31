"""The secure-inference server child is started through the library (`python -m piformer.pi.serve`),
never through piformer's own command line."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_server_entry_point_parses_the_cli_flags():
    out = subprocess.run([sys.executable, "-m", "piformer.pi.serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--checkpoint", "--listen", "--client", "--queries"):
        assert flag in out.stdout


def test_two_process_runs_start_the_library_server(monkeypatch, tmp_path):
    from piformer.pi import secure

    started = []

    class Refuse(Exception):
        pass

    def popen(cmd, **kwargs):
        started.append(cmd)
        raise Refuse

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(Refuse):
        secure.run_two_process(str(tmp_path / "run"), [1, 2, 3], which="last", ports=(1, 2), log_dir=str(tmp_path))
    (cmd,) = started
    assert cmd[:3] == [sys.executable, "-m", "piformer.pi.serve"]
    assert cmd[3:] == [str(tmp_path / "run"), "--checkpoint", "last", "--listen", "127.0.0.1:2", "--client", "127.0.0.1:1"]
    assert not any("piformer.cli" in part for part in cmd)
