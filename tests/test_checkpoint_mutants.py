"""What the mutation run of `checkpoint.py` showed no test would notice (docs/testing.md):
which checkpoint a run directory's defaults pick, where the temporary save directory lives, a
half-written checkpoint directory, and the exact wording of a shape mismatch."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import piformer.checkpoint as ck
from piformer.config import ModelConfig
from piformer.model import PiGPT


def _model(seed: int) -> PiGPT:
    torch.manual_seed(seed)
    return PiGPT(ModelConfig.from_preset("SM", size="tiny")).eval()


def _run_with_best_and_last(tmp_path: Path) -> tuple[Path, PiGPT, PiGPT]:
    run = tmp_path / "run"
    best, last = _model(1), _model(2)
    ck.save_checkpoint(run / "checkpoints" / "best", best, trainer_state={"step": 10})
    ck.save_checkpoint(run / "checkpoints" / "last", last, trainer_state={"step": 20})
    return run, best, last


def _same_weights(a: PiGPT, b: PiGPT) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_run_directory_loads_best_weights_and_last_trainer_state_by_default(tmp_path):
    run, best, last = _run_with_best_and_last(tmp_path)
    assert _same_weights(ck.load_model(run), best)
    assert _same_weights(ck.load_model(run, which="last"), last)
    assert ck.load_trainer_state(run)["step"] == 20  # resume reads last's state
    assert ck.load_trainer_state(run, which="best")["step"] == 10


def test_load_model_puts_the_model_on_the_device_it_is_given(tmp_path):
    ck.save_checkpoint(tmp_path / "c", _model(0))
    model = ck.load_model(tmp_path / "c", device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_directory_with_only_one_of_the_two_files_is_not_a_checkpoint(tmp_path):
    run, _, last = _run_with_best_and_last(tmp_path)
    (run / "checkpoints" / "best" / ck.WEIGHTS).unlink()  # config.json alone
    assert ck.resolve_checkpoint(run) == run / "checkpoints" / "last"
    run2, _, _ = _run_with_best_and_last(tmp_path / "second")
    (run2 / "checkpoints" / "best" / ck.CONFIG).unlink()  # weights alone
    assert ck.resolve_checkpoint(run2) == run2 / "checkpoints" / "last"


def test_a_save_is_assembled_in_a_hidden_sibling_directory(tmp_path, monkeypatch):
    """Beside its target (same filesystem, so the final rename is atomic), named after it."""
    written = []
    real = ck.save_file

    def spy(tensors, filename, metadata=None):
        written.append(Path(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", spy)
    ck.save_checkpoint(tmp_path / "ckpts" / "last", _model(0))
    (target,) = written
    assert target.parent.parent == tmp_path / "ckpts"
    assert target.parent.name.startswith(".last.tmp-")
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["last"]  # the temporary is gone


def _mismatch_message(ckpt: Path) -> str:
    with pytest.raises(ValueError) as err:
        ck.load_model(ckpt)
    return str(err.value)


def test_shapes_that_disagree_with_config_json_are_named_with_how_many_more(tmp_path):
    model = _model(0)
    ckpt = ck.save_checkpoint(tmp_path / "c", model)
    cfg = json.loads((ckpt / ck.CONFIG).read_text())
    cfg["n_embd"] = 64  # every weight's shape now disagrees
    (ckpt / ck.CONFIG).write_text(json.dumps(cfg))
    try:  # what torch itself says, to count the mismatches independently
        PiGPT(ModelConfig.from_saved(cfg)).load_state_dict(load_file(str(ckpt / ck.WEIGHTS)), strict=False)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
    assert len(lines) > 2
    msg = _mismatch_message(ckpt)
    assert msg == f"checkpoint {ckpt} does not match its config.json: {lines[0]} (and {len(lines) - 1} more)"


def _shorten(ckpt: Path, names: list[str]) -> list[str]:
    """Cut one row off each named tensor; torch's own lines for the mismatches, in its order."""
    tensors = load_file(str(ckpt / ck.WEIGHTS))
    for name in names:
        tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(ckpt / ck.WEIGHTS))
    cfg = ModelConfig.from_saved(json.loads((ckpt / ck.CONFIG).read_text()))
    try:
        PiGPT(cfg).load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        return [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
    return []


def test_a_single_disagreeing_shape_is_named_alone(tmp_path):
    ckpt = ck.save_checkpoint(tmp_path / "c", _model(0))
    (line,) = _shorten(ckpt, ["transformer.wpe.weight"])
    assert _mismatch_message(ckpt) == f"checkpoint {ckpt} does not match its config.json: {line}"


def test_two_disagreeing_shapes_name_the_first_and_one_more(tmp_path):
    ckpt = ck.save_checkpoint(tmp_path / "c", _model(0))
    lines = _shorten(ckpt, ["transformer.wpe.weight", "transformer.wte.weight"])
    assert len(lines) == 2
    assert _mismatch_message(ckpt) == f"checkpoint {ckpt} does not match its config.json: {lines[0]} (and 1 more)"


def test_missing_and_unexpected_tensors_are_listed_up_to_five(tmp_path):
    ckpt = ck.save_checkpoint(tmp_path / "c", _model(0))
    tensors = load_file(str(ckpt / ck.WEIGHTS))
    names = sorted(tensors)
    for n in names[:6]:
        del tensors[n]
    for i in range(6):
        tensors[f"extra.{i}"] = torch.zeros(1)
    save_file(tensors, str(ckpt / ck.WEIGHTS))
    msg = _mismatch_message(ckpt)
    listed = re.search(r"missing \[(.*)\], unexpected \[(.*)\]", msg)
    assert listed and listed.group(1).count("'") == 10 and listed.group(2).count("'") == 10  # 5 names each


def test_a_failed_save_leaves_nothing_behind_and_raises_its_own_error(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path / "ckpts" / "last", _model(0))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ck.save_checkpoint(tmp_path / "ckpts" / "last", _model(1))
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["last"]  # no temporary, no .old
    assert _same_weights(ck.load_model(tmp_path / "ckpts" / "last"), _model(0))  # the old one, intact


def test_overwriting_leaves_only_the_new_checkpoint(tmp_path):
    target = tmp_path / "ckpts" / "last"
    ck.save_checkpoint(target, _model(0))
    (tmp_path / "ckpts" / "last.old").mkdir()  # a stale one from an earlier kill
    ck.save_checkpoint(target, _model(1))
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["last"]
    assert _same_weights(ck.load_model(target), _model(1))
