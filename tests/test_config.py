import json

import pytest

from piformer.config import ARCH_PRESETS, SIZE_PRESETS, ModelConfig, field_docs, parse_overrides, train_recipe

PAPER_PRESETS = [
    "SM+LN+G", "SM+LN+R", "SM+LN", "SM+G", "SM+R", "SM",
    *[f"SM+{k}({g})" for k in ("WN", "SN") for g in ("QK", "FFN", "QK+FFN", "QKV+FFN", "QKVO+FFN")],
    "SM+ScFFN", "SM+ScFuFFN", "SM(t)+ScFuFFN", "EReg(SM(t)+ScFuFFN)",
]


def test_every_paper_preset_is_named_exactly():
    assert set(PAPER_PRESETS) == set(ARCH_PRESETS)


def test_size_presets_match_the_paper():
    small = ModelConfig.from_preset("SM+LN+G", size="gpt2-small")
    assert (small.n_layer, small.n_head, small.n_embd, small.block_size) == (12, 12, 768, 128)
    assert ModelConfig.from_preset("SM", size="gpt2-18l").n_layer == 18
    cpu = ModelConfig.from_preset("SM", size="cpu-small")
    assert (cpu.n_layer, cpu.n_head, cpu.n_embd, cpu.block_size) == (6, 8, 256, 128)
    assert "tiny" in SIZE_PRESETS


def test_preset_fields():
    final = ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", size="tiny")
    assert (final.norm, final.ffn_act, final.ffn, final.ffn_scale) == ("none", "none", "fused", True)
    assert final.attn_temperature and final.entropy_reg
    assert final.temperature_init == 1e-2 and final.temperature_param == "exp"
    # The regulariser's loss settings are training settings; the recipe defaults are the paper's
    # CodeParrot values in the form the authors trained with.
    recipe = train_recipe("tiny")
    assert (recipe.reg_lambda, recipe.reg_gamma, recipe.reg_mode, recipe.reg_reduction) == (1e-5, 0.2, "query", "sum")
    assert not hasattr(final, "reg_lambda") and train_recipe("languini").reg_lambda == 5e-5
    assert ModelConfig.from_preset("SM+WN(QKV+FFN)", size="tiny").weight_norm_layers == {"q", "k", "v", "ffn"}
    assert ModelConfig.from_preset("SM+SN(QK)", size="tiny").spectral_norm_layers == {"q", "k"}


def test_overrides_and_json_round_trip(tmp_path):
    cfg = ModelConfig.from_preset("SM+LN+R", size="tiny", n_layer=3, temperature_init="0.3")
    assert cfg.n_layer == 3 and cfg.temperature_init == 0.3
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: ModelConfig.from_preset("SM+LN+X"), "valid presets: SM+LN+G"),
        (lambda: ModelConfig.from_preset("SM", size="huge"), "valid sizes: gpt2-small"),
        (lambda: ModelConfig.from_dict({"n_layers": 2}), "valid fields: n_layer"),
        (lambda: ModelConfig(ffn_act="swish"), "'gelu', 'relu', 'none'"),
        (lambda: ModelConfig(ffn="fused", ffn_act="gelu"), "ffn_act"),
        (lambda: ModelConfig(weight_norm="qk+mlp"), "valid groups: qk, qkv, qkvo, ffn"),
        (lambda: ModelConfig(n_embd=100, n_head=3), "divisible"),
        (lambda: ModelConfig.from_dict({"n_layer": "two"}), "cannot read 'two' as int"),
        (lambda: parse_overrides(["model.nope=1"]), "valid model fields"),
        (lambda: parse_overrides(["nope=1"]), "unknown config key"),
        (lambda: train_recipe("tiny", schedule="step"), "'linear', 'cosine'"),
    ],
)
def test_bad_input_names_what_is_valid(call, needle):
    with pytest.raises(ValueError, match=None) as err:
        call()
    assert needle in str(err.value)


def test_every_field_is_documented():
    docs = field_docs(ModelConfig)
    from dataclasses import fields

    assert {f.name for f in fields(ModelConfig)} == set(docs)


def test_loss_settings_moved_to_training_and_say_so():
    with pytest.raises(ValueError, match="use train.reg_lambda"):
        parse_overrides(["model.reg_lambda=1e-4"])
    assert parse_overrides(["reg_gamma=0.3", "train.reg_reduction=mean"])["train"] == {
        "reg_gamma": "0.3", "reg_reduction": "mean"}
    with pytest.raises(ValueError, match="reg_mode='query'"):
        train_recipe("tiny", reg_mode="head")  # 'sum' (the default) needs the per-row form
    assert train_recipe("tiny", reg_mode="head", reg_reduction="mean").reg_loss().mode == "head"
