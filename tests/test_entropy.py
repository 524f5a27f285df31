import math

import pytest
import torch

from piformer.config import ModelConfig, RegLoss
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
                b.attn.set_temperature(t)
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
    got = entropy_penalty(ent, theta, T, gamma, reduction="mean")
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
    assert entropy_penalty(rows, theta, T, 0.2, reduction="mean").item() == pytest.approx((0.5 * lt) ** 2)
    assert entropy_penalty(rows, theta, T, 0.2, reduction="sum").item() == pytest.approx(2 * (0.5 * lt) ** 2)
    model = PiGPT(ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", size="tiny"))
    idx = torch.randint(0, 97, (2, 16))
    out = model(idx, targets=idx, reg=RegLoss(mode="query"))
    assert out.reg_loss is not None and torch.isfinite(out.reg_loss)


def test_entropy_gradient_stays_finite_under_large_upstream_gradients():
    # The regulariser multiplies the entropy's gradient by lambda * 2 * dev; with large lambda
    # the naive p*log(p) on finfo.min-filled logits would overflow to NaN.
    logits = torch.randn(2, 6, 6, requires_grad=True)
    filled = logits.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    (row_entropy_from_logits(filled).sum() * 1e6).backward()
    assert torch.isfinite(logits.grad).all()


def _appendix_b_listing(attentions, thresholds, seq_len, fraction, eps):
    """The paper's Appendix B listing, line by line (with each layer's own thresholds, as
    Algorithm 1 says): per-row gated squared deviation, summed over batch and query rows,
    divided by heads, summed over layers, divided by layers."""
    entropy_reg_loss = 0
    max_entropy = torch.log(torch.tensor(seq_len, dtype=torch.float32))
    tolerance_margin = fraction * max_entropy
    for layer_idx, attn_mat in enumerate(attentions):
        reg_threshold_weights = thresholds[layer_idx]
        ent_val = -torch.sum(attn_mat * torch.log(attn_mat + eps), dim=-1)
        layer_entropy_reg_loss = 0
        num_heads = attn_mat.shape[1]
        for head_idx in range(num_heads):
            head_entropy = ent_val[:, head_idx, :]
            threshold = reg_threshold_weights[head_idx] * max_entropy
            deviation = torch.abs(head_entropy - threshold)
            penalty = torch.square(torch.where(deviation > tolerance_margin, deviation, torch.zeros_like(deviation)))
            layer_entropy_reg_loss += penalty.sum()
        layer_entropy_reg_loss /= num_heads
        entropy_reg_loss += layer_entropy_reg_loss
    entropy_reg_loss /= len(attentions)
    return entropy_reg_loss


@pytest.mark.parametrize("gamma, eps", [(0.1, 1e-9), (0.2, 1e-9), (0.3, 1e-12)])
def test_sum_reduction_equals_the_appendix_b_listing(gamma, eps):
    torch.manual_seed(0)
    model = PiGPT(ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", size="tiny")).double()
    with torch.no_grad():  # spread attentions and thresholds so many rows sit outside the band
        for b in model.transformer.h:
            b.attn.q_proj.weight.normal_(0, 0.3)
            b.attn.k_proj.weight.normal_(0, 0.3)
            b.attn.reg_threshold.uniform_(0.1, 0.9)
    idx = torch.randint(0, 97, (3, 16))
    out = model(idx, targets=idx, return_attention=True, reg=RegLoss(lam=1e-5, gamma=gamma, mode="query", reduction="sum"))
    ref = _appendix_b_listing(out.attentions, model.thresholds().detach(), 16, gamma, eps)
    assert ref.item() > 1.0  # the listing's magnitude: a sum over 3 x 16 rows, not a mean
    assert out.reg_loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(out.loss, out.ce_loss + 1e-5 * out.reg_loss)
    # and on random attention matrices fed to the penalty directly
    probs = torch.softmax(torch.randn(2, 4, 3, 16, 16, dtype=torch.float64) * 3
                          + torch.full((16, 16), float("-inf"), dtype=torch.float64).triu(1), dim=-1)
    theta = torch.rand(2, 3, dtype=torch.float64)
    rows = torch.stack([-(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1) for p in probs])  # (L, B, H, T)
    got = entropy_penalty(rows.permute(0, 2, 1, 3).reshape(2, 3, -1), theta, 16, gamma, reduction="sum")
    assert got.item() == pytest.approx(_appendix_b_listing(list(probs), theta, 16, gamma, eps).item(), rel=1e-6, abs=1e-6)


def test_the_loss_and_its_gradient_move_with_lambda():
    torch.manual_seed(1)
    model = PiGPT(ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", size="tiny"))
    idx = torch.randint(0, 97, (2, 16))
    grads, losses = [], []
    for lam in (0.0, 1e-5, 1e-2):
        model.zero_grad()
        out = model(idx, targets=idx, reg=RegLoss(lam=lam))
        out.loss.backward()
        losses.append(out.loss.item() - out.ce_loss.item())
        grads.append(model.transformer.h[0].attn.q_proj.weight.grad.clone())
    assert losses[0] == 0.0 and 0 < losses[1] < losses[2]
    assert losses[2] / losses[1] == pytest.approx(1e3, rel=1e-2)  # float32 differences of ~5-nat losses
    assert not torch.allclose(grads[0], grads[2])


def test_head_mode_cannot_sum_and_the_tolerance_band_share_is_reported():
    from piformer.config import TrainConfig
    from piformer.entropy import outside_tolerance

    with pytest.raises(ValueError, match="reg_mode='query'"):
        TrainConfig(reg_mode="head", reg_reduction="sum")
    T = 16
    lt = math.log(T)
    theta = torch.tensor([[0.5, 0.5]])
    ent = torch.tensor([[0.5 * lt, 0.5 * lt + 0.5 * lt]])  # one head on target, one far above
    assert outside_tolerance(ent, theta, T, 0.2) == 0.5
    assert outside_tolerance(ent, theta, T, 0.6) == 0.0
