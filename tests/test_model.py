import math

import pytest
import torch
import torch.nn as nn

from piformer.config import ARCH_PRESETS, ModelConfig, RegLoss
from piformer.model import EXPLICIT, PiGPT

torch.manual_seed(0)


def tiny(preset, **kw):
    torch.manual_seed(0)
    return PiGPT(ModelConfig.from_preset(preset, size="tiny", **kw))


def batch(cfg, B=3):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


@pytest.mark.parametrize("preset", list(ARCH_PRESETS))
def test_every_preset_trains_forward_backward(preset):
    model = tiny(preset)
    idx, tgt = batch(model.config)
    out = model(idx, targets=tgt)
    assert out.logits.shape == (3, model.config.block_size, model.config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("preset", list(ARCH_PRESETS))
def test_nonlinearities_present_only_where_the_preset_says(preset):
    model = tiny(preset)
    cfg = model.config
    blocks = model.transformer.h
    lns = [m for m in blocks.modules() if isinstance(m, nn.LayerNorm)]
    acts = [m for m in blocks.modules() if isinstance(m, (nn.GELU, nn.ReLU))]
    assert len(lns) == (2 * cfg.n_layer if cfg.norm == "layernorm" else 0)
    assert len(acts) == (0 if cfg.ffn_act == "none" else cfg.n_layer)
    assert isinstance(model.transformer.ln_f, nn.LayerNorm)  # the final LN is always kept


def test_fused_ffn_equals_the_two_linear_composition_it_replaces():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("SM", size="tiny")
    two = PiGPT(cfg).transformer.h[0].mlp
    fused = PiGPT(ModelConfig.from_preset("SM+ScFuFFN", size="tiny", ffn_scale=False)).transformer.h[0].mlp
    with torch.no_grad():  # W_out (W_in x + b_in) + b_out = (W_out W_in) x + (W_out b_in + b_out)
        fused.c_fused.weight.copy_(two.c_proj.weight @ two.c_fc.weight)
        fused.c_fused.bias.copy_(two.c_proj.weight @ two.c_fc.bias + two.c_proj.bias)
    x = torch.randn(2, 5, cfg.n_embd)
    torch.testing.assert_close(fused(x), two(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in two.parameters()) / 4


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM", "SM(t)+ScFuFFN", "SM+WN(QKVO+FFN)"])
def test_sdpa_and_explicit_paths_give_the_same_logits(preset):
    model = tiny(preset).eval()
    with torch.no_grad():
        for b in model.transformer.h:  # make temperatures non-uniform so the per-row scaling matters
            if b.attn.temperature is not None:
                b.attn.set_temperature(torch.empty(b.attn.temperature.shape).uniform_(0.5, 2.0))
    idx, _ = batch(model.config)
    fused = model(idx).logits
    explicit = model(idx, return_attention=True)
    assert explicit.attentions is not None
    torch.testing.assert_close(fused, explicit.logits, atol=1e-5, rtol=1e-5)


def test_temperature_divides_the_logits_per_head_and_query_position():
    model = tiny("SM(t)+ScFuFFN").eval()
    attn = model.transformer.h[0].attn
    assert attn.temperature.shape == (model.config.n_head, model.config.block_size)
    assert torch.all(attn.temperature == 1e-2)
    x = torch.randn(1, model.config.block_size, model.config.n_embd)
    with torch.no_grad():
        attn.set_temperature(1.0)
        _, p1, _ = attn(x, EXPLICIT)
        attn.set_temperature(2.0)
        _, p2, _ = attn(x, EXPLICIT)
        q = attn.q_proj(x).view(1, -1, 2, 16).transpose(1, 2)
        k = attn.k_proj(x).view(1, -1, 2, 16).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / (2.0 * math.sqrt(16))
        mask = torch.ones_like(logits, dtype=torch.bool).tril()
        ref = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(p2, ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(p1, p2)


@pytest.mark.parametrize("preset", [p for p in ARCH_PRESETS if "WN" in p or "SN" in p])
def test_folding_static_norms_keeps_the_logits(preset):
    model = tiny(preset)
    idx, tgt = batch(model.config)
    # a few optimiser steps so the norms' state is not just the initial one
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(idx, targets=tgt).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        before = model(idx).logits
        names_before = set(model.state_dict())
        model.fold_static_norms()
        after = model(idx).logits
    assert any("parametrizations" in n for n in names_before)
    assert not any("parametrizations" in n for n in model.state_dict())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_weight_norm_rows_have_learnable_norms_and_spectral_norm_has_unit_sigma():
    wn = tiny("SM+WN(QK)").eval()
    q = wn.transformer.h[0].attn.q_proj
    torch.testing.assert_close(q.weight.norm(dim=1), q.parametrizations.weight.original0.flatten())
    sn = tiny("SM+SN(FFN)")
    for _ in range(30):  # power iteration converges in training-mode forwards
        sn(batch(sn.config)[0])
    w = sn.eval().transformer.h[0].mlp.c_fc.weight
    assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 1e-3


@pytest.mark.parametrize("param", ["exp", "raw"])
def test_gradients_reach_thresholds_temperatures_alpha_beta(param):
    model = tiny("EReg(SM(t)+ScFuFFN)", temperature_param=param)
    idx, tgt = batch(model.config)
    out = model(idx, targets=tgt, reg=RegLoss(lam=1.0, gamma=0.0, mode="head", reduction="mean"))
    assert out.reg_loss is not None and out.reg_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss + out.reg_loss)
    out.loss.backward()
    b = model.transformer.h[1]
    for p in (b.attn.reg_threshold, b.attn.temperature_leaf, b.ffn_alpha, b.ffn_beta):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_scaled_ffn_uses_alpha_and_beta():
    model = tiny("SM+ScFFN").eval()
    idx, _ = batch(model.config)
    with torch.no_grad():
        base = model(idx).logits
        model.transformer.h[0].ffn_beta.fill_(0.5)
        changed_beta = model(idx).logits
        model.transformer.h[0].ffn_beta.fill_(1.0)
        model.transformer.h[0].ffn_alpha.fill_(1e6)  # FFN branch ~ switched off
        no_ffn = model(idx).logits
    assert not torch.allclose(base, changed_beta)
    assert not torch.allclose(base, no_ffn)


def test_head_entropy_and_cache_names():
    model = tiny("SM+LN+G").eval()
    idx, _ = batch(model.config)
    out = model(idx, return_attention=True)
    L, H = model.config.n_layer, model.config.n_head
    assert out.head_entropy.shape == (L, H)
    pattern = out.cache["blocks.1.attn.hook_pattern"]
    assert pattern.shape == (3, H, 16, 16)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(3, H, 16))
    assert torch.all(pattern.triu(1) == 0)  # causal
    torch.testing.assert_close(out.cache["blocks.1.attn.hook_entropy"].mean(dim=(0, 2)), out.head_entropy[1])


def test_sequence_longer_than_the_context_is_rejected():
    model = tiny("SM+LN+G")
    with pytest.raises(ValueError, match="exceeds the model's context block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_optimizer_groups_exempt_norms_biases_and_learnables():
    model = tiny("EReg(SM(t)+ScFuFFN)", weight_norm="qk")
    decay, no_decay = model.optim_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert any("temperature" in n for n in nd) and any("reg_threshold" in n for n in nd)
    assert any("ffn_alpha" in n for n in nd) and any("original0" in n for n in nd)
    assert all(not n.endswith("bias") and "ln_" not in n for n in d)
    assert any("c_fused.weight" in n for n in d)


def test_strided_targets_such_as_a_shifted_slice_are_accepted():
    model = tiny("EReg(SM(t)+ScFuFFN)")
    idx, _ = batch(model.config)
    x, y = idx[:, :-1], idx[:, 1:]  # y is a non-contiguous view: .view(-1) would raise
    assert not y.is_contiguous()
    out = model(x, targets=y)
    ref = model(x.contiguous(), targets=y.contiguous())
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
