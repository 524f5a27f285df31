"""The analytic PI cost reproduces every FLOP and nonlinear-op entry of Tables 2, 3, 6 and 7."""

import json

import pytest

from piformer.config import ModelConfig
from piformer.pi.cost import PAPER_TABLES, paper_billions, pi_cost

# Nonlinear-op strings as the paper prints them, per table (L, T) and config.
PAPER_NONLINEAR = {
    ("SM+LN+G", 12, 128): "SM:144xR^{128x128}, LN:24xR^{128x768}, G:12xR^{128x3072}",
    ("SM+LN+R", 12, 128): "SM:144xR^{128x128}, LN:24xR^{128x768}, R:12xR^{128x3072}",
    ("SM+ScFuFFN", 12, 128): "SM:144xR^{128x128}",
    ("EReg(SM(t)+ScFuFFN)", 12, 128): "SM:144xR^{128x128}",
    ("SM+LN+G", 12, 256): "SM:144xR^{256x256}, LN:24xR^{256x768}, G:12xR^{256x3072}",
    ("SM+LN+R", 12, 256): "SM:144xR^{256x256}, LN:24xR^{256x768}, R:12xR^{256x3072}",
    ("SM+ScFuFFN", 12, 256): "SM:144xR^{256x256}",
    ("EReg(SM(t)+ScFuFFN)", 12, 256): "SM:144xR^{256x256}",
    ("SM+LN+G", 12, 512): "SM:144xR^{512x512}, LN:24xR^{512x768}, G:12xR^{512x3072}",
    ("SM+LN+R", 12, 512): "SM:144xR^{512x512}, LN:24xR^{512x768}, R:12xR^{512x3072}",
    ("SM+ScFuFFN", 12, 512): "SM:144xR^{512x512}",
    ("EReg(SM(t)+ScFuFFN)", 12, 512): "SM:144xR^{512x512}",
    ("SM+LN+G", 18, 128): "SM:216xR^{128x128}, LN:36xR^{128x768}, G:18xR^{128x3072}",
    ("SM+LN+R", 18, 128): "SM:216xR^{128x128}, LN:36xR^{128x768}, R:18xR^{128x3072}",
    ("SM+ScFuFFN", 18, 128): "SM:216xR^{128x128}",
    ("EReg(SM(t)+ScFuFFN)", 18, 128): "SM:216xR^{128x128}",
}

CASES = [(table, preset) for table, t in PAPER_TABLES.items() for preset in t["rows"]]


@pytest.mark.parametrize("table,preset", CASES)
def test_paper_tables(table, preset):
    t = PAPER_TABLES[table]
    cfg = ModelConfig.from_preset(preset, size=t["size"], block_size=t["seq_len"])
    cost = pi_cost(cfg, t["seq_len"], preset=preset)
    row = t["rows"][preset]
    assert cost.ffn_flops_str == row["ffn"]
    assert cost.attn_flops_str == row["attn"]
    assert cost.nonlinear_str() == PAPER_NONLINEAR[(preset, cfg.n_layer, t["seq_len"])]
    # the final LayerNorm is listed but not counted
    assert cost.final_layernorm.shape == (t["seq_len"], 768) and cost.final_layernorm.count == 1


def test_exact_numbers_and_printing():
    cfg = ModelConfig.from_preset("SM+LN+G", size="gpt2-small")
    c = pi_cost(cfg)
    T, d, L, V = 128, 768, 12, cfg.vocab_size
    assert c.ffn_flops == 4 * T * d * 4 * d * L == 14_495_514_624
    assert c.attn_flops == 8 * T * d * d * L + 3 * T * T * d * L == 7_700_742_144
    assert c.macs["blocks_total"] == (4 * T * d * d + 2 * T * T * d + 8 * T * d * d) * L
    assert c.embedding_macs == c.head_macs == T * V * d
    # The paper's printed 7.3B (Table 3, fused FFN, T=512) is 7.248B rounded twice.
    assert paper_billions(7_247_757_312) == "7.3B"
    assert paper_billions(1_811_939_328) == "1.8B"


def test_seq_len_checks():
    cfg = ModelConfig.from_preset("SM", size="tiny")
    with pytest.raises(ValueError, match="block_size"):
        pi_cost(cfg, cfg.block_size + 1)


def test_cli(capsys, tmp_path):
    from piformer.cli import main

    assert main(["pi-cost", "--preset", "SM+ScFuFFN", "--size", "gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert "1.8B" in out and "7.7B" in out and "Table 2" in out and "6.43" in out

    assert main(["pi-cost", "--preset", "SM+LN+R", "--size", "gpt2-small", "--seq-len", "256", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ffn_flops_paper"] == "29.0B" and d["paper"]["table"] == "6"

    # from a run directory: config.json, flat or nested under "model"
    cfg = ModelConfig.from_preset("SM+LN+G", size="gpt2-18l")
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    assert main(["pi-cost", str(tmp_path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ffn_flops_paper"] == "21.7B" and d["attn_flops_paper"] == "11.6B"

    assert main(["pi-cost", str(tmp_path / "missing")]) == 2
    assert main(["pi-cost", "--preset", "NOPE"]) == 2
