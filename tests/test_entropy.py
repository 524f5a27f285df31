import math

import pytest
import torch

from piformer.config import ModelConfig
from piformer.entropy import (
    diagnose,
    entropy_penalty,
    head_bands,
    head_entropy,
    row_entropy,
    row_entropy_from_logits,
    uniform_causal_entropy,
)
from piformer.model import PiGPT


def test_uniform_causal_attention_entropy_is_mean_log_i_plus_1():
    T = 10
    probs = torch.ones(T, T).tril()
    probs = (probs / probs.sum(-1, keepdim=True)).expand(2, 3, T, T)
    expected = sum(math.log(i + 1) for i in range(T)) / T
    torch.testing.assert_close(head_entropy(probs), torch.full((3,), expected))
    assert uniform_causal_entropy(T) == pytest.approx(expected)


def test_one_hot_rows_have_zero_entropy():
    probs = torch.eye(8).expand(1, 2, 8, 8)
    assert torch.all(head_entropy(probs) == 0)


def test_stable_entropy_matches_the_eps_formula():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 9) * 5
    p = torch.softmax(logits, -1)
    eps_form = -(p * torch.log(p + 1e-12)).sum(-1)
    torch.testing.assert_close(row_entropy_from_logits(logits), eps_form, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row_entropy(p), eps_form, atol=1e-5, rtol=1e-5)
    # masked (finite fill) entries contribute exactly nothing and keep gradients finite
    masked = logits.clone().requires_grad_(True)
    filled = masked.masked_fill(torch.arange(9) > 4, torch.finfo(torch.float32).min)
    e = row_entropy_from_logits(filled)
    e.sum().backward()
    torch.testing.assert_close(e, row_entropy_from_logits(logits[..., :5]))
    assert torch.isfinite(masked.grad).all()


def test_temperature_moves_entropy_the_way_appendix_a_says():
    torch.manual_seed(0)
    model = PiGPT(ModelConfig.from_preset("SM(t)+ScFuFFN", size="tiny")).eval()
    with torch.no_grad():  # sharpen q and k so the logits are far from uniform at t = 1
        for b in model.transformer.h:
            b.attn.q_proj.weight.normal_(0, 0.5)
            b.attn.k_proj.weight.normal_(0, 0.5)
    idx = torch.randint(0, 97, (2, 16))
    ents = []
    for t in (0.1, 1.0, 10.0):
        with torch.no_grad():
            for b in model.transformer.h:
                b.attn.temperature.fill_(t)
            ents.append(model(idx, return_entropy=True).head_entropy[0])
    assert torch.all(ents[0] < ents[1]) and torch.all(ents[1] < ents[2])
    assert ents[2].max() <= math.log(16)


def test_bands_relative_to_max_and_absolute():
    e = torch.tensor([[0.1, 1.0, 2.0], [3.0, 3.9, 4.0]])  # max 4 -> quarters of width 1
    assert head_bands(e) == pytest.approx([1 / 6, 1 / 6, 1 / 6, 3 / 6])
    assert head_bands(e, reference=8.0) == pytest.approx([2 / 6, 3 / 6, 1 / 6, 0.0])  # quarters of width 2


def test_diagnosis_flags_overloaded_early_and_collapsed_deep_layers():
    T = 128
    lt = math.log(T)
    e = torch.tensor([[0.95 * lt] * 4, [0.9 * lt, 0.8 * lt, 0.5 * lt, 0.4 * lt], [0.5 * lt] * 4, [0.01, 0.02, 0.05, 0.6 * lt]])
    d = diagnose(e, T)
    assert d.overloaded_layers == [0, 1]
    assert d.collapsed_layers == [3]
    assert (3, 3) not in d.collapsed_heads and (3, 0) in d.collapsed_heads
    assert "0.75" in d.criteria and "log T" in d.criteria


def test_penalty_matches_a_hand_computed_example():
    T = 16
    lt = math.log(T)
    gamma = 0.2  # tolerance 0.2 * log 16 = 0.5545
    theta = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    ent = torch.tensor([[0.5 * lt + 1.0, 0.5 * lt + 0.3], [0.25 * lt - 2.0, 0.75 * lt]])
    # layer 0: head 0 dev 1.0 > tol -> 1.0; head 1 dev 0.3 <= tol -> 0   => layer mean 0.5
    # layer 1: head 0 dev -2.0 -> 4.0; head 1 dev 0                      => layer mean 2.0
    got = entropy_penalty(ent, theta, T, gamma)
    assert got.item() == pytest.approx((0.5 + 2.0) / 2)


def test_penalty_uses_each_layers_own_thresholds():
    T = 16
    lt = math.log(T)
    ent = torch.tensor([[0.2 * lt], [0.8 * lt]])
    own = torch.tensor([[0.2], [0.8]])
    first_reused = torch.tensor([[0.2], [0.2]])  # the released code's bug
    assert entropy_penalty(ent, own, T, 0.0).item() == pytest.approx(0.0, abs=1e-10)
    assert entropy_penalty(ent, first_reused, T, 0.0).item() > 0.1
    model = PiGPT(ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", size="tiny"))
    with torch.no_grad():
        model.transformer.h[1].attn.reg_threshold.fill_(0.9)
    th = model.thresholds().detach()
    assert th.shape == (2, 2) and th[0, 0] == 0.5 and th[1, 0].item() == pytest.approx(0.9)


def test_per_query_mode_penalises_rows_not_averages():
    T = 16
    lt = math.log(T)
    theta = torch.tensor([[0.5]])
    rows = torch.tensor([[[0.0, lt]]])  # two rows far from 0.5 log T either side, mean exactly on target
    assert entropy_penalty(rows.mean(-1), theta, T, 0.2).item() == pytest.approx(0.0)
    assert entropy_penalty(rows, theta, T, 0.2).item() == pytest.approx((0.5 * lt) ** 2)
    model = PiGPT(ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", size="tiny", reg_mode="query"))
    idx = torch.randint(0, 97, (2, 16))
    out = model(idx, targets=idx)
    assert out.reg_loss is not None and torch.isfinite(out.reg_loss)


def test_entropy_gradient_stays_finite_under_large_upstream_gradients():
    # The regulariser multiplies the entropy's gradient by lambda * 2 * dev; with large lambda
    # the naive p*log(p) on finfo.min-filled logits would overflow to NaN.
    logits = torch.randn(2, 6, 6, requires_grad=True)
    filled = logits.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    (row_entropy_from_logits(filled).sum() * 1e6).backward()
    assert torch.isfinite(logits.grad).all()
