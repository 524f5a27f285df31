import json
import os

import pytest
import torch

from piformer.checkpoint import load_model, load_trainer_state, resolve_checkpoint, save_checkpoint
from piformer.config import ModelConfig
from piformer.model import PiGPT


@pytest.mark.parametrize("preset", ["SM+LN+G", "EReg(SM(t)+ScFuFFN)", "SM+WN(QK+FFN)", "SM+SN(FFN)"])
def test_round_trip_is_one_call_and_exact(tmp_path, preset):
    torch.manual_seed(0)
    model = PiGPT(ModelConfig.from_preset(preset, size="tiny")).eval()
    save_checkpoint(tmp_path / "ckpt", model, trainer_state={"step": 7})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors", "trainer_state.pt"]
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx).logits)
    assert load_trainer_state(tmp_path / "ckpt")["step"] == 7
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_run_directory_resolves_best_then_last(tmp_path):
    model = PiGPT(ModelConfig.from_preset("SM", size="tiny"))
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last", model)
    assert resolve_checkpoint(tmp_path / "run").name == "last"
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best", model)
    assert resolve_checkpoint(tmp_path / "run").name == "best"
    assert resolve_checkpoint(tmp_path / "run", which="last").name == "last"


def test_overwrite_keeps_a_loadable_checkpoint_at_every_moment(tmp_path):
    a = PiGPT(ModelConfig.from_preset("SM", size="tiny"))
    save_checkpoint(tmp_path / "last", a)
    # simulate a kill between the two renames of the next save: only last.old remains
    os.replace(tmp_path / "last", tmp_path / "last.old")
    assert resolve_checkpoint(tmp_path / "last").name == "last.old"
    load_model(tmp_path / "last")
    save_checkpoint(tmp_path / "last", a)
    assert not (tmp_path / "last.old").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries left


def test_bad_checkpoints_fail_with_a_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint or run directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors and config.json"):
        load_model(tmp_path / "empty")
    model = PiGPT(ModelConfig.from_preset("SM", size="tiny"))
    save_checkpoint(tmp_path / "c", model)
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        load_model(tmp_path / "c")
    save_checkpoint(tmp_path / "d", model)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its config.json"):
        load_model(tmp_path / "d")
