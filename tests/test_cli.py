"""One command-line convention: the same flag names for the same things in every subcommand."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import piformer
from piformer.cli import build_parser, main
from piformer.config import ARCH_PRESETS, TrainConfig


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _all_parsers():
    """Every parser, nested ones (`data prepare`) included, as (name, parser)."""
    todo = [("piformer", build_parser())]
    while todo:
        name, p = todo.pop()
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {k}", sub) for k, sub in a.choices.items()]


def _flags(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


def test_every_flag_has_help_text():
    missing = [(name, a.option_strings or a.dest) for name, p in _all_parsers() for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert missing == []


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"piformer {piformer.__version__}"


def test_version_from_the_installed_entry_point():
    out = subprocess.run([sys.executable, "-m", "piformer.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"piformer {piformer.__version__}"


def test_presets_json_lists_architectures_sizes_and_fields(capsys):
    assert main(["presets", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert list(d["architectures"]) == list(ARCH_PRESETS)
    assert "cpu-small" in d["sizes"]
    train = {f["name"]: f for f in d["fields"]["train"]}
    assert train["seed"]["default"] == TrainConfig().seed and train["max_steps"]["doc"]


# ---------------------------------------------------------------------------------------
# --checkpoint best|last wherever a run's checkpoint is chosen; --which is a hidden old spelling


CHOOSE_CHECKPOINT = ("entropy", "pi-run", "pi-serve", "eval")


@pytest.mark.parametrize("command", CHOOSE_CHECKPOINT)
def test_checkpoint_flag_and_its_deprecated_alias(command, capsys):
    p = _subparsers()[command]
    flags = _flags(p)
    assert flags["--checkpoint"].choices == ("best", "last") and flags["--checkpoint"].default == "best"
    assert "--which" not in p.format_help()  # hidden
    args = p.parse_args(["RUN", "--which", "last"])
    assert args.checkpoint == "last"
    assert p.parse_args(["RUN", "--checkpoint", "last"]).checkpoint == "last"
    assert p.parse_args(["RUN"]).checkpoint == "best"


def test_the_old_spelling_warns(capsys):
    _subparsers()["pi-serve"].parse_args(["RUN", "--which", "last"])
    assert "--which is deprecated; use --checkpoint" in capsys.readouterr().err


def test_no_subcommand_offers_which_in_its_help():
    for name, p in _all_parsers():
        assert "--which" not in p.format_help(), name


# ---------------------------------------------------------------------------------------
# --device and --seed


@pytest.mark.parametrize("command", ("train", "entropy", "eval"))
def test_commands_that_compute_take_device(command):
    assert "--device" in _flags(_subparsers()[command])


def test_train_device_seed_and_tensorboard_flags_set_the_train_config(tmp_path):
    from piformer.cli.train import build_configs
    from piformer.data import prepare

    data = tmp_path / "data"
    prepare("builtin", data, vocab_size=300, max_files=5, progress=False)
    p = _subparsers()["train"]
    args = p.parse_args(["--size", "tiny", "--data", str(data), "--out", str(tmp_path / "run"),
                         "--device", "cpu", "--seed", "7", "--tensorboard", "--set", "train.seed=3"])
    _, train_cfg, *_ = build_configs(args)
    assert (train_cfg.device, train_cfg.seed, train_cfg.tensorboard) == ("cpu", 7, True)  # the flag wins over --set
    args = p.parse_args(["--size", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--set", "train.seed=3"])
    _, train_cfg, *_ = build_configs(args)
    assert (train_cfg.seed, train_cfg.tensorboard) == (3, False)


def test_bad_device_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    from piformer.data import prepare

    data = tmp_path / "data"
    prepare("builtin", data, vocab_size=300, max_files=5, progress=False)
    code = main(["train", "--size", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "tpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "device" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_reproduce_help_states_the_quick_tiers_measured_time():
    import re
    from pathlib import Path

    text = _subparsers()["reproduce"].format_help()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    measured = re.search(r"--tier quick .*?\(([\d.]+) min measured on 2 CPU cores\)", readme).group(1)
    assert f"{measured} min measured" in " ".join(text.split())
