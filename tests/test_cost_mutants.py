"""What the mutation run of `pi/cost.py` showed no test would notice: the printed table's
section headings and shapes, and a sequence length of 0 passed to the library."""

import pytest

from piformer.config import ModelConfig
from piformer.pi.cost import format_cost, pi_cost


def test_a_zero_sequence_length_is_refused_not_replaced_by_the_block_size():
    cfg = ModelConfig.from_preset("SM+LN+G", size="tiny")
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        pi_cost(cfg, 0)
    assert pi_cost(cfg).seq_len == cfg.block_size  # None still means the block size


def test_the_printed_table_has_its_sections_and_shapes():
    cfg = ModelConfig.from_preset("SM+LN+G", size="tiny")  # T=16, d=32: a T x d shape cannot read as d x d
    text = format_cost(pi_cost(cfg, preset="SM+LN+G"))
    lines = text.splitlines()
    heads = ["nonlinear operations (paper convention; final LayerNorm listed apart)", "FLOPs (paper convention)",
             "multiply-accumulates (exact, transformer blocks)"]
    for head in heads:
        i = lines.index(head)
        assert lines[i - 1] == ""  # each section is set apart by one empty line
    assert "  listed apart:" in lines
    assert any(line.startswith("  vocab projection ") and line.endswith("(T x d x V)") for line in lines)
    assert any(line.startswith("  layernorm ") and "x R^(16 x 32)" in line for line in lines)
    assert any(line.startswith("  gelu ") and "x R^(16 x 128)" in line for line in lines)
