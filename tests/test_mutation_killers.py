"""Tests that kill mistakes a mutation run found no test would notice (docs/testing.md).

Each test pins one formula or one wiring decision of the paper against a reference computed
here, by hand, in plain PyTorch: no JAX, no SPU. The mutants they were written against are
named in the docstrings (mutmut's names, tools/mutation.sh); the point is the mistake, not the
name: weights applied to the wrong linear, a mode ignored, a comparison off by its edge.
"""

import dataclasses
import math

import pytest
import torch
from torch.nn.utils import parametrize

from piformer.config import ModelConfig, RegLoss, TrainConfig
from piformer.entropy import (
    diagnose,
    entropy_penalty,
    head_bands,
    head_entropy,
    outside_tolerance,
    row_entropy,
)
from piformer.model import PiGPT
from tiny_runs import tiny, tokens


def _sharpen(model: PiGPT, std: float = 0.4) -> None:
    """Spread the attention patterns (and thresholds) so rows sit on both sides of every band."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for b in model.transformer.h:
            for lin in (b.attn.q_proj, b.attn.k_proj):
                w = lin.parametrizations.weight.original if parametrize.is_parametrized(lin, "weight") else lin.weight
                w.copy_(torch.randn(w.shape, generator=g) * std)
            if b.attn.reg_threshold is not None:
                b.attn.reg_threshold.copy_(torch.rand(b.attn.reg_threshold.shape, generator=g))


# ---------------------------------------------------------------------------------------
# Entropy (Eq. 7) and the head bands / diagnosis


def test_row_and_head_entropy_use_the_eps_they_are_given():
    """row_entropy is -sum p log(p + eps) (the paper's listing), not log(p - eps); head_entropy
    passes its eps on."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64) * 2, -1)
    eps = 0.05
    ref = -(p * torch.log(p + eps)).sum(-1)
    torch.testing.assert_close(row_entropy(p, eps), ref.float())
    torch.testing.assert_close(head_entropy(p, eps), ref.mean(dim=(0, 2)).float())
    assert not torch.allclose(head_entropy(p, eps), head_entropy(p))


def test_diagnosis_edges_and_every_field():
    """A head exactly at 3/4 log T is overloaded (>=), exactly at 1/4 log T not collapsed (<); a
    layer with exactly `layer_share` of its heads flagged is flagged. L != H so that rows and
    columns cannot be confused."""
    T = 64
    lt = math.log(T)
    e = torch.tensor([
        [0.75 * lt, 0.5 * lt],  # layer 0: one head exactly at the overload edge -> 1/2 of heads
        [0.25 * lt, 0.5 * lt],  # layer 1: one head exactly at the collapse edge -> not collapsed
        [0.1 * lt, 0.2 * lt],   # layer 2: both collapsed
    ])
    d = diagnose(e, T)
    assert d.e_max == pytest.approx(lt)
    assert d.overload_threshold == pytest.approx(0.75 * lt) and d.collapse_threshold == pytest.approx(0.25 * lt)
    assert d.overloaded_heads == [(0, 0)]
    assert d.collapsed_heads == [(2, 0), (2, 1)]
    assert d.overloaded_layers == [0]  # 1 of 2 heads = layer_share 0.5: flagged
    assert d.collapsed_layers == [2]
    assert diagnose(e, T, layer_share=0.75).overloaded_layers == []
    half = diagnose(torch.tensor([[0.1, 0.9 * lt], [0.9 * lt, 0.9 * lt], [0.1, 0.1]]), T)
    assert half.collapsed_layers == [0, 2] and half.overloaded_layers == [0, 1]
    assert d.to_dict()["collapsed_heads"] == [(2, 0), (2, 1)] and d.to_dict()["e_max"] == d.e_max


def test_diagnosis_summary_names_the_flagged_layers():
    T = 16
    lt = math.log(T)
    d = diagnose(torch.tensor([[0.9 * lt, 0.9 * lt], [0.01, 0.02], [0.5 * lt, 0.5 * lt]]), T)
    assert d.summary().splitlines() == [
        d.criteria,
        "entropic overload: layers [0] (2 heads)",
        "entropy collapse: layers [1] (2 heads)",
    ]
    quiet = diagnose(torch.full((2, 2), 0.5 * lt), T).summary().splitlines()
    assert quiet[1:] == ["entropic overload: none (0 heads)", "entropy collapse: none (0 heads)"]
    assert "E_max = log T = 2.773 nats (T=16)" in d.criteria and "0.25*E_max = 0.693" in d.criteria


def test_head_bands_at_zero_and_below_zero():
    """All-zero entropies (reference 0) are all in the lowest band, not a division by zero; a
    rounding-level negative value counts in the lowest band, not as a bincount error."""
    assert head_bands(torch.zeros(4)) == [1.0, 0.0, 0.0, 0.0]
    assert head_bands(torch.tensor([-1e-7, 1.0, 1.0, 1.0])) == [0.25, 0.0, 0.0, 0.75]


# ---------------------------------------------------------------------------------------
# The regulariser (Algorithm 1 / Appendix B)


def test_the_band_edge_itself_is_free():
    """Appendix B: penalise where deviation > margin. Exactly at the margin, nothing."""
    T, gamma = 32, 0.25
    margin = gamma * math.log(T)
    theta = torch.zeros(1, 2, dtype=torch.float64)
    at_edge = torch.tensor([[margin, -margin]], dtype=torch.float64)  # theta = 0: deviation = E exactly
    assert entropy_penalty(at_edge, theta, T, gamma).item() == 0.0
    assert outside_tolerance(at_edge, theta, T, gamma).item() == 0.0
    past = torch.tensor([[margin * (1 + 1e-12), 0.0]], dtype=torch.float64)
    assert entropy_penalty(past, theta, T, gamma).item() == pytest.approx(margin**2 / 2)


def test_penalty_defaults_are_the_papers_and_a_bad_reduction_says_what_is_valid():
    T = 16
    lt = math.log(T)
    theta = torch.full((1, 1), 0.5)
    e = torch.tensor([[0.5 * lt + 0.15 * lt]])  # inside gamma = 0.2, outside gamma = 0.1
    assert entropy_penalty(e, theta, T).item() == 0.0
    assert entropy_penalty(e, theta, T, 0.1).item() > 0
    rows = torch.tensor([[[0.0, 0.0, lt]]])
    assert entropy_penalty(rows, theta, T).item() == pytest.approx(3 * (0.5 * lt) ** 2)  # default: sum
    assert RegLoss() == RegLoss(lam=1e-5, gamma=0.2, mode="query", reduction="sum")
    with pytest.raises(ValueError, match="unknown reduction 'max'; valid: 'sum', 'mean'"):
        entropy_penalty(rows, theta, T, reduction="max")


def test_train_config_hands_every_loss_setting_to_the_model():
    """TrainConfig.reg_* reach RegLoss in the right slots (a swapped or dropped field would
    silently train with the default)."""
    cfg = TrainConfig(reg_lambda=3e-4, reg_gamma=0.35, reg_mode="head", reg_reduction="mean")
    assert cfg.reg_loss() == RegLoss(lam=3e-4, gamma=0.35, mode="head", reduction="mean")
    assert TrainConfig(reg_reduction="mean").reg_loss() == RegLoss(reduction="mean")


def _per_row(out, cfg):
    """(L, H, B*T) row entropies from the attention probabilities the model returned."""
    rows = torch.stack([row_entropy(p) for p in out.attentions])  # (L, B, H, T)
    return rows.permute(0, 2, 1, 3).reshape(cfg.n_layer, cfg.n_head, -1)


@pytest.mark.parametrize("gamma", [0.05, 0.2])
def test_reg_mode_head_and_query_are_different_penalties(gamma):
    """'head' penalises each head's query-averaged entropy (Algorithm 1), 'query' every row
    (Appendix B); the model must compute the one it is asked for, with the lambda, gamma and
    reduction it is given, and add lambda times it to the cross-entropy."""
    model = tiny("EReg(SM(t)+ScFuFFN)")
    _sharpen(model)
    cfg = model.config
    idx = tokens(cfg)
    T = cfg.block_size
    th = model.thresholds().detach()
    head = model(idx, targets=idx, return_attention=True, reg=RegLoss(lam=0.3, gamma=gamma, mode="head", reduction="mean"))
    query_sum = model(idx, targets=idx, return_attention=True, reg=RegLoss(lam=0.3, gamma=gamma, mode="query"))
    query_mean = model(idx, targets=idx, reg=RegLoss(lam=0.3, gamma=gamma, mode="query", reduction="mean"))
    rows = _per_row(head, cfg)
    want_head = entropy_penalty(head.head_entropy, th, T, gamma, "mean")
    want_sum = entropy_penalty(rows, th, T, gamma, "sum")
    want_mean = entropy_penalty(rows, th, T, gamma, "mean")
    torch.testing.assert_close(head.reg_loss, want_head)
    torch.testing.assert_close(query_sum.reg_loss, want_sum)
    torch.testing.assert_close(query_mean.reg_loss, want_mean)
    assert len({round(x.item(), 6) for x in (want_head, want_sum, want_mean)}) == 3  # three different numbers
    torch.testing.assert_close(head.loss, head.ce_loss + 0.3 * want_head)
    torch.testing.assert_close(query_sum.loss, query_sum.ce_loss + 0.3 * want_sum)
    torch.testing.assert_close(head.reg_outside, outside_tolerance(head.head_entropy, th, T, gamma))
    torch.testing.assert_close(query_sum.reg_outside, outside_tolerance(rows, th, T, gamma))
    default = model(idx, targets=idx)  # no reg given: the paper's RegLoss()
    torch.testing.assert_close(default.reg_loss, entropy_penalty(rows, th, T, 0.2, "sum"))
    torch.testing.assert_close(default.loss, default.ce_loss + 1e-5 * default.reg_loss)


def test_lambda_scales_the_penalty_in_loss_and_gradient_exactly():
    """loss = CE + lambda * penalty: its gradient is grad CE + lambda * grad penalty, for the
    lambda given (a mutant that drops, squares or fixes lambda fails here)."""
    model = tiny("EReg(SM(t)+ScFuFFN)")
    _sharpen(model)
    idx = tokens(model.config)
    w = model.transformer.h[0].attn.q_proj.weight

    def grad(lam):
        model.zero_grad()
        out = model(idx, targets=idx, reg=RegLoss(lam=lam))
        out.loss.backward()
        return out, w.grad.clone()

    o0, g0 = grad(0.0)
    o1, g1 = grad(1.0)
    o2, g2 = grad(2.5)
    assert o1.reg_loss.item() > 0
    torch.testing.assert_close(o0.loss, o0.ce_loss)
    torch.testing.assert_close(o2.loss - o2.ce_loss, 2.5 * o1.reg_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2 - g0, 2.5 * (g1 - g0), rtol=1e-4, atol=1e-6)
    assert (g1 - g0).abs().max() > 1e-4


def test_no_penalty_without_entropy_reg_or_without_targets():
    plain = tiny("SM(t)+ScFuFFN")
    idx = tokens(plain.config)
    out = plain(idx, targets=idx, reg=RegLoss(lam=1.0))
    assert out.reg_loss is None and out.reg_outside is None and out.head_entropy is None
    torch.testing.assert_close(out.loss, out.ce_loss)
    assert plain.thresholds() is None
    ereg = tiny("EReg(SM(t)+ScFuFFN)")
    out = ereg(idx)
    assert out.loss is None and out.reg_loss is None


# ---------------------------------------------------------------------------------------
# Weight and spectral normalisation: the right linears, the right formula, folded exactly

_LINEARS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "c_proj"}


@pytest.mark.parametrize("groups, expected", [
    ("qk", {"q_proj", "k_proj"}),
    ("qkv", {"q_proj", "k_proj", "v_proj"}),
    ("qkvo", {"q_proj", "k_proj", "v_proj", "c_proj"}),
    ("ffn", {"c_fused"}),
    ("qk+ffn", {"q_proj", "k_proj", "c_fused"}),
])
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_normalisation_lands_on_exactly_the_named_linears(kind, groups, expected):
    """WN(QK) must normalise Q and K, never V or O (and so on for every group)."""
    model = tiny("SM+ScFuFFN", **{kind: groups})
    for block in model.transformer.h:
        linears = {f"{n}": getattr(block.attn, n) for n in _LINEARS.values()} | {"c_fused": block.mlp.c_fused}
        normed = {n for n, m in linears.items() if parametrize.is_parametrized(m, "weight")}
        assert normed == expected
        for n in normed:
            tag = "original0" if kind == "weight_norm" else "original"
            assert hasattr(linears[n].parametrizations.weight, tag)


def test_ffn_group_normalises_both_ffn_linears_of_a_standard_ffn():
    model = tiny("SM+LN+G", weight_norm="ffn")
    mlp = model.transformer.h[1].mlp
    assert parametrize.is_parametrized(mlp.c_fc, "weight") and parametrize.is_parametrized(mlp.c_proj, "weight")
    assert not parametrize.is_parametrized(model.transformer.h[1].attn.c_proj, "weight")


def test_weight_norm_is_g_times_the_unit_direction_per_output_row():
    model = tiny("SM+WN(QK)")
    k = model.transformer.h[0].attn.k_proj
    g = k.parametrizations.weight.original0
    v = k.parametrizations.weight.original1
    with torch.no_grad():
        g.mul_(torch.linspace(0.5, 2.0, g.numel()).view_as(g))  # g no longer the initial norms
    torch.testing.assert_close(k.weight, g * v / v.norm(dim=1, keepdim=True))
    assert g.shape == (k.out_features, 1)


def test_folding_in_training_mode_keeps_the_outputs_and_the_mode():
    """fold_static_norms must not let spectral norm take another power-iteration step (which it
    does in training mode), and leaves the model in the mode it found it in."""
    model = tiny("SM+SN(QKVO+FFN)")
    idx = tokens(model.config)
    model.train()
    model(idx)  # one power-iteration step: far from converged, so another would move sigma
    model.eval()
    with torch.no_grad():
        before = model(idx).logits
    model.train()
    model.fold_static_norms()
    assert model.training
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    model.eval()
    with torch.no_grad():
        after = model(idx).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    model.fold_static_norms()  # nothing left to fold: a no-op, in eval mode it stays
    assert not model.training


def test_folding_turns_a_log_space_temperature_into_plain_t():
    model = tiny("SM(t)+ScFuFFN")
    attn = model.transformer.h[0].attn
    t = torch.linspace(0.2, 3.0, attn.temperature.numel()).view_as(attn.temperature)
    attn.set_temperature(t)
    torch.testing.assert_close(attn.temperature, t)
    torch.testing.assert_close(attn.temperature_leaf, t.log())
    model.fold_static_norms()
    assert "transformer.h.0.attn.temperature" in model.state_dict()
    torch.testing.assert_close(model.state_dict()["transformer.h.0.attn.temperature"], t)


# ---------------------------------------------------------------------------------------
# ScFFN and the per-query temperature, by hand


def _capture(module, store, key, output_index=None):
    def hook(_m, args, out):
        store[key + "_in"] = args[0]
        store[key] = out if output_index is None else out[output_index]
    return module.register_forward_hook(hook)


def test_scaled_ffn_is_beta_x_sa_plus_ffn_over_alpha():
    """ScFFN (Section 4): X_out = beta * X_sa + FFN(X_sa) / alpha, per layer, with X_sa the
    attention sub-block's output (input + attention)."""
    model = tiny("SM+ScFuFFN").eval()
    block = model.transformer.h[1]
    with torch.no_grad():
        block.ffn_alpha.fill_(2.5)
        block.ffn_beta.fill_(0.7)
    seen = {}
    hooks = [_capture(block, seen, "block", 0), _capture(block.attn, seen, "attn", 0), _capture(block.mlp, seen, "mlp")]
    with torch.no_grad():
        model(tokens(model.config))
    for h in hooks:
        h.remove()
    x_sa = seen["block_in"] + seen["attn"]
    torch.testing.assert_close(seen["mlp_in"], x_sa)  # no LayerNorm in SM+ScFuFFN: FFN sees X_sa
    torch.testing.assert_close(seen["block"], 0.7 * x_sa + seen["mlp"] / 2.5)
    # and the fused FFN is the one d x d linear
    mlp = block.mlp
    torch.testing.assert_close(seen["mlp"], seen["mlp_in"] @ mlp.c_fused.weight.T + mlp.c_fused.bias)


def test_plain_block_is_a_pre_ln_residual():
    model = tiny("SM+LN+G").eval()
    block = model.transformer.h[0]
    seen = {}
    hooks = [_capture(block, seen, "block", 0), _capture(block.attn, seen, "attn", 0),
             _capture(block.mlp, seen, "mlp"), _capture(block.ln_1, seen, "ln1"), _capture(block.ln_2, seen, "ln2")]
    with torch.no_grad():
        model(tokens(model.config))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["ln1_in"], seen["block_in"])
    x_sa = seen["block_in"] + seen["attn"]
    torch.testing.assert_close(seen["ln2_in"], x_sa)
    torch.testing.assert_close(seen["block"], x_sa + seen["mlp"])


@pytest.mark.parametrize("param", ["exp", "raw"])
def test_each_query_row_of_each_head_has_its_own_temperature(param):
    """softmax(q_i . k_j / (t[h, i] sqrt(D))) with t of shape (H, T): row i of head h divided by
    its own t, checked on the attention probabilities against a reference built from the
    projections by hand (no JAX)."""
    model = tiny("SM(t)+ScFuFFN", temperature_param=param).eval()
    _sharpen(model, 0.3)
    cfg = model.config
    H, T, D = cfg.n_head, cfg.block_size, cfg.head_dim
    t = torch.linspace(0.3, 3.0, H * T).view(H, T)
    t = t[:, torch.randperm(T, generator=torch.Generator().manual_seed(3))]  # no monotone pattern
    for b in model.transformer.h:
        b.attn.set_temperature(t)
    attn = model.transformer.h[1].attn
    seen = {}
    hook = _capture(attn, seen, "attn", 0)
    idx = tokens(cfg, B=2)
    with torch.no_grad():
        out = model(idx, return_attention=True)
        fast = model(idx).logits
    hook.remove()
    x = seen["attn_in"]
    B = x.shape[0]
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, H, D).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) / (t[None, :, :, None] * math.sqrt(D))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    ref = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(out.attentions[1], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, out.logits, rtol=1e-5, atol=1e-5)  # the fused path divides the same rows
    v = attn.v_proj(x).view(B, T, H, D).transpose(1, 2)
    y = (ref @ v).transpose(1, 2).reshape(B, T, H * D)
    torch.testing.assert_close(seen["attn"], attn.c_proj(y), rtol=1e-5, atol=1e-5)


def test_temperatures_start_at_their_init_and_are_reported_per_layer():
    model = tiny("SM(t)+ScFuFFN", temperature_init=0.3)
    t = model.temperatures()
    assert t.shape == (2, 2, 16)
    torch.testing.assert_close(t, torch.full((2, 2, 16), 0.3))
    assert tiny("SM+ScFuFFN").temperatures() is None


# ---------------------------------------------------------------------------------------
# Resume: the best validation loss so far is never forgotten


def test_resume_takes_the_lower_of_lasts_record_and_the_best_checkpoints(tmp_path):
    """`last` records the best loss it knew when saved; a best checkpoint saved after it knows a
    lower one. Resume must continue from the lower, or the next evaluation would overwrite that
    best checkpoint with a worse model."""
    from piformer.checkpoint import save_checkpoint
    from piformer.train import _best_so_far

    best_dir = tmp_path / "best"
    last_state = {"step": 4, "best_val_loss": 2.0, "best_step": 4}
    assert _best_so_far(last_state, best_dir) == (2.0, 4)  # no best checkpoint yet
    assert _best_so_far({"step": 4}, best_dir) == (math.inf, None)  # nothing evaluated yet
    model = tiny("SM")
    save_checkpoint(best_dir, model, trainer_state={"step": 6, "best_val_loss": 1.5, "best_step": 6})
    assert _best_so_far(last_state, best_dir) == (1.5, 6)  # newer and better: kept
    save_checkpoint(best_dir, model, trainer_state={"step": 2, "best_val_loss": 2.5, "best_step": 2})
    assert _best_so_far(last_state, best_dir) == (2.0, 4)  # a worse record never wins
    save_checkpoint(best_dir, model)  # a best checkpoint without trainer state
    assert _best_so_far(last_state, best_dir) == (2.0, 4)
    (best_dir / "trainer_state.pt").write_bytes(b"torn")  # unreadable: last's record stands
    assert _best_so_far(last_state, best_dir) == (2.0, 4)


# ---------------------------------------------------------------------------------------
# Configs: every check at its edge, with a message that names the field


def _err(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


@pytest.mark.parametrize("field, bad, edge", [
    ("n_layer", 0, 1), ("n_head", 0, 1), ("n_embd", 0, None), ("block_size", 0, 1), ("vocab_size", 0, 1),
    ("temperature_init", 0.0, 1e-12),
])
def test_model_config_sizes_must_be_positive(field, bad, edge):
    kw = {"n_head": 1} if field == "n_embd" else {}
    msg = _err(lambda: ModelConfig(**{**kw, field: bad}))
    assert msg.startswith(f"ModelConfig.{field} must be") and msg.endswith(f"got {bad!r}" if field != "temperature_init" else f"got {bad}")
    if edge is not None:
        assert getattr(ModelConfig(**{"n_head": 1, "n_embd": 4, field: edge}), field) == edge


def test_model_config_choices_and_combinations_name_what_is_valid():
    assert _err(lambda: ModelConfig(norm="rms")) == "ModelConfig.norm: unknown value 'rms'; valid: 'layernorm', 'none'"
    assert _err(lambda: ModelConfig(ffn="wide")).startswith("ModelConfig.ffn: unknown value 'wide'; valid: 'standard'")
    assert "ModelConfig.temperature_param: unknown value 'log'" in _err(lambda: ModelConfig(temperature_param="log"))
    assert "ModelConfig.spectral_norm: unknown group 'kq'" in _err(lambda: ModelConfig(spectral_norm="kq"))
    assert _err(lambda: ModelConfig(n_embd=30, n_head=4)) == "ModelConfig.n_embd=30 must be divisible by n_head=4"
    assert _err(lambda: ModelConfig(ffn_act="swish")) == "ModelConfig.ffn_act: unknown value 'swish'; valid: 'gelu', 'relu', 'none'"
    assert _err(lambda: ModelConfig(ffn="fused", ffn_act="relu")) == (
        "ModelConfig.ffn='fused' merges the FFN's two linears, which is only exact without an activation; "
        "got ffn_act='relu' (valid with 'fused': 'none')")
    assert ModelConfig(ffn="fused", ffn_act="none").ffn == "fused"
    cfg = ModelConfig(n_embd=48, n_head=4)
    assert cfg.head_dim == 12


def test_norm_groups_parse_case_and_space_insensitively():
    from piformer.config import parse_norm_groups

    assert parse_norm_groups(" QK+FFN ") == {"q", "k", "ffn"}
    assert parse_norm_groups("qkvo") == {"q", "k", "v", "o"}
    assert parse_norm_groups("None") == parse_norm_groups("") == parse_norm_groups(None) == frozenset()
    msg = _err(lambda: parse_norm_groups("qk+mlp", "spectral_norm"))
    assert msg.startswith("ModelConfig.spectral_norm: unknown group 'mlp' in 'qk+mlp'; valid groups: qk, qkv, qkvo, ffn")
    assert _err(lambda: parse_norm_groups("x")).startswith("ModelConfig.weight_norm: unknown group 'x'")  # default name
    cfg = ModelConfig(weight_norm="qkv", spectral_norm="ffn")
    assert cfg.weight_norm_layers == {"q", "k", "v"} and cfg.spectral_norm_layers == {"ffn"}


def _train_ok(**kw):
    return TrainConfig(**kw)


@pytest.mark.parametrize("kw, words", [
    ({"max_steps": 0}, "TrainConfig.max_steps must be > 0, got 0"),
    ({"batch_size": 0}, "TrainConfig.batch_size must be > 0"),
    ({"micro_batch_size": 0}, "TrainConfig.micro_batch_size must be > 0"),
    ({"eval_interval": 0}, "TrainConfig.eval_interval must be > 0"),
    ({"eval_batches": 0}, "TrainConfig.eval_batches must be > 0"),
    ({"log_interval": 0}, "TrainConfig.log_interval must be > 0"),
    ({"checkpoint_interval": 0}, "TrainConfig.checkpoint_interval must be > 0"),
    ({"reg_grad_interval": -1}, "TrainConfig.reg_grad_interval must be >= 0"),
    ({"reg_gamma": -1e-9}, "TrainConfig.reg_gamma must be >= 0"),
    ({"reg_lambda": -1e-9}, "TrainConfig.reg_lambda must be >= 0"),
    ({"reg_gamma": float("nan")}, "TrainConfig.reg_gamma must be >= 0"),
    ({"lr": 0.0}, "TrainConfig.lr must be a finite number > 0, got 0.0"),
    ({"lr": float("inf")}, "TrainConfig.lr must be a finite number > 0"),
    ({"eps": 0.0}, "TrainConfig.eps must be a finite number > 0"),
    ({"min_lr": -1e-9}, "TrainConfig.min_lr must be a finite number >= 0"),
    ({"warmup": float("nan")}, "TrainConfig.warmup must be a finite number >= 0"),
    ({"weight_decay": -0.1}, "TrainConfig.weight_decay must be a finite number >= 0"),
    ({"grad_clip": -1.0}, "TrainConfig.grad_clip must be a finite number >= 0"),
    ({"lr": 1e-3, "min_lr": 2e-3}, "TrainConfig.min_lr=0.002 must not exceed lr=0.001"),
    ({"beta1": 1.0}, "TrainConfig.beta1 must be in [0, 1), got 1.0"),
    ({"beta2": -0.1}, "TrainConfig.beta2 must be in [0, 1)"),
    ({"schedule": "step"}, "TrainConfig.schedule: unknown value 'step'; valid: 'linear', 'cosine'"),
    ({"dtype": "fp64"}, "TrainConfig.dtype: unknown value 'fp64'"),
    ({"device": "tpu"}, "TrainConfig.device: unknown value 'tpu'"),
    ({"reg_mode": "row"}, "TrainConfig.reg_mode: unknown value 'row'; valid: 'query', 'head'"),
    ({"reg_reduction": "max"}, "TrainConfig.reg_reduction: unknown value 'max'; valid: 'sum', 'mean'"),
    ({"reg_mode": "head"}, "TrainConfig.reg_reduction='sum' needs reg_mode='query'"),
])
def test_train_config_rejects_with_a_message_naming_the_field(kw, words):
    assert _err(lambda: TrainConfig(**kw)).startswith(words)


def test_head_mode_with_sum_says_which_pairs_are_valid():
    assert _err(lambda: TrainConfig(reg_mode="head", reg_reduction="sum")) == (
        "TrainConfig.reg_reduction='sum' needs reg_mode='query' (the head form penalises one query-averaged "
        "entropy per head: nothing to sum); use reg_reduction='mean' with reg_mode='head'")


def test_train_config_accepts_every_edge_value():
    edge = TrainConfig(max_steps=1, batch_size=1, micro_batch_size=1, eval_interval=1, eval_batches=1,
                       log_interval=1, checkpoint_interval=1, reg_grad_interval=0, reg_gamma=0.0, reg_lambda=0.0,
                       lr=1e-9, eps=1e-30, min_lr=1e-9, warmup=0.0, weight_decay=0.0, grad_clip=0.0,
                       beta1=0.0, beta2=0.0, schedule="cosine", dtype="fp32", device="cpu",
                       reg_mode="head", reg_reduction="mean")
    assert edge.min_lr == edge.lr and edge.reg_loss() == RegLoss(0.0, 0.0, "head", "mean")
    assert TrainConfig.from_dict(edge.to_dict()) == edge
    assert TrainConfig(reg_mode="query", reg_reduction="mean").reg_reduction == "mean"


def test_presets_sizes_and_overrides_layer_in_that_order():
    lang = ModelConfig.from_preset("SM(t)+ScFuFFN", size="languini")
    assert (lang.block_size, lang.temperature_init, lang.ffn) == (512, 0.1, "fused")
    over = ModelConfig.from_preset("SM(t)+ScFuFFN", size="languini", temperature_init=0.5, norm="layernorm")
    assert (over.temperature_init, over.norm) == (0.5, "layernorm")
    default = ModelConfig.from_preset()
    assert (default.norm, default.ffn_act, default.n_layer, default.block_size) == ("layernorm", "gelu", 12, 128)
    assert "unknown preset 'X'; valid presets: SM+LN+G, SM+LN+R" in _err(lambda: ModelConfig.from_preset("X"))
    assert "unknown size 'huge'; valid sizes: gpt2-small" in _err(lambda: ModelConfig.from_preset("SM", "huge"))
    from piformer.config import train_recipe

    assert train_recipe("tiny").max_steps == 50 and train_recipe("tiny", max_steps=7).max_steps == 7
    assert train_recipe("languini").schedule == "cosine" and train_recipe("gpt2-small") == TrainConfig()
    assert "unknown size 'big'; valid sizes:" in _err(lambda: train_recipe("big"))


def test_saved_configs_drop_the_moved_loss_fields_and_keep_old_temperatures_raw():
    new = ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", size="tiny").to_dict()
    assert ModelConfig.from_saved(new).temperature_param == "exp"
    legacy = {k: v for k, v in new.items() if k != "temperature_param"}
    legacy.update(reg_lambda=1e-5, reg_gamma=0.2, reg_mode="query")
    old = ModelConfig.from_saved(legacy)
    assert old.temperature_param == "raw" and not hasattr(old, "reg_lambda")
    assert ModelConfig.from_saved({**legacy, "temperature_param": "exp"}).temperature_param == "exp"
    only_gamma = {k: v for k, v in legacy.items() if k not in ("reg_lambda", "reg_mode")}
    assert ModelConfig.from_saved(only_gamma).temperature_param == "raw"
    assert "reg_lambda" in legacy  # from_saved reads a copy


def test_json_files_and_text_read_back(tmp_path):
    cfg = ModelConfig.from_preset("SM+WN(QK)", size="tiny")
    text = cfg.to_json(tmp_path / "c.json")
    on_disk = (tmp_path / "c.json").read_text()
    assert on_disk == text + "\n" and text.startswith('{\n  "attn_temperature": false,')  # sorted, indented
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert ModelConfig.from_json(str(tmp_path / "c.json")) == cfg
    assert ModelConfig.from_json("  \n" + text) == cfg
    assert _err(lambda: ModelConfig.from_dict({"n_layer": "two"})) == "ModelConfig.n_layer: cannot read 'two' as int"
    assert "unknown ModelConfig field(s) 'a', 'b'; valid fields: n_layer, n_head" in _err(
        lambda: ModelConfig.from_dict({"b": 1, "a": 2}))


@pytest.mark.parametrize("field, text, value", [
    ("bias", "yes", True), ("bias", " ON ", True), ("bias", "1", True), ("bias", "off", False),
    ("bias", "No", False), ("bias", "0", False), ("bias", 1, True), ("bias", 0.0, False),
    ("n_layer", "1e1", 10), ("n_layer", "7", 7), ("n_layer", 3.0, 3), ("temperature_init", "3e-4", 3e-4),
    ("temperature_init", 2, 2.0), ("norm", "none", "none"),
])
def test_cli_strings_become_the_fields_type(field, text, value):
    got = getattr(ModelConfig.from_dict({field: text}), field)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("field, text", [
    ("bias", "maybe"), ("bias", 2), ("bias", None), ("n_layer", 2.5), ("n_layer", "2.5"), ("temperature_init", "hot"),
])
def test_values_that_do_not_fit_the_type_are_refused(field, text):
    kind = {"bias": "bool", "n_layer": "int", "temperature_init": "float"}[field]
    assert _err(lambda: ModelConfig.from_dict({field: text})) == f"ModelConfig.{field}: cannot read {text!r} as {kind}"


def test_every_field_of_both_configs_has_its_docstring():
    from dataclasses import fields

    from piformer.config import field_docs

    docs = field_docs(TrainConfig)
    assert {f.name for f in fields(TrainConfig)} == set(docs)
    assert docs["max_steps"] == "Optimizer steps to train for."
    assert field_docs(ModelConfig)["n_layer"] == "Number of transformer blocks (L)."
    assert "  " not in field_docs(ModelConfig)["norm"] and "\n" not in field_docs(ModelConfig)["norm"]
    assert field_docs(int) == {}  # no source to read: nothing, not an error


def test_set_overrides_split_sections_and_refuse_what_is_unknown():
    from piformer.config import parse_overrides

    assert parse_overrides(None) == parse_overrides([]) == {"model": {}, "train": {}}
    got = parse_overrides([" model.n_layer =4", "lr=3e-4", "bias=false", "train.reg_mode=a=b"])
    assert got == {"model": {"n_layer": "4", "bias": "false"}, "train": {"lr": "3e-4", "reg_mode": "a=b"}}
    assert _err(lambda: parse_overrides(["n_layer"])) == "--set expects key=value, got 'n_layer'"
    assert _err(lambda: parse_overrides(["optim.lr=1"])) == (
        "--set optim.lr: unknown section 'optim'; valid sections: model, train")
    msg = _err(lambda: parse_overrides(["depth=3"]))
    assert msg.startswith("--set depth: unknown config key; valid keys: model.attn_temperature, ")
    assert "train.weight_decay" in msg
    assert _err(lambda: parse_overrides(["model.reg_gamma=0.1"])) == (
        "--set model.reg_gamma: the regulariser's loss settings are training settings now; use train.reg_gamma")
    assert _err(lambda: parse_overrides(["model.n_layer.x=1"])).startswith(
        "--set model.n_layer.x: unknown model field 'n_layer.x'; valid model fields: ")
    assert _err(lambda: parse_overrides(["train.n_layer=2"])).startswith(
        "--set train.n_layer: unknown train field 'n_layer'; valid train fields: batch_size, beta1")


# ---------------------------------------------------------------------------------------
# The model's construction and bookkeeping


def test_bias_false_removes_every_bias_and_init_follows_init_std():
    torch.manual_seed(0)
    model = PiGPT(ModelConfig.from_preset("SM+LN+G", size="tiny", bias=False, init_std=0.3, n_embd=64))
    assert all(m.bias is None for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    w = model.transformer.h[0].mlp.c_fc.weight
    assert abs(w.std().item() - 0.3) < 0.02 and abs(w.mean().item()) < 0.02
    assert abs(model.transformer.wpe.weight.std().item() - 0.3) < 0.03
    with_bias = tiny("SM+LN+G")
    biases = [m.bias for m in with_bias.modules() if isinstance(m, torch.nn.Linear) and m is not with_bias.lm_head]
    assert biases and all(b is not None and torch.all(b == 0) for b in biases)
    assert all(m.bias is not None for m in with_bias.modules() if isinstance(m, torch.nn.LayerNorm))


def test_fresh_learnables_start_where_the_paper_says():
    model = tiny("EReg(SM(t)+ScFuFFN)", reg_threshold_init=0.3, temperature_init=0.05)
    b = model.transformer.h[1]
    assert b.ffn_alpha.item() == 1.0 and b.ffn_beta.item() == 1.0 and b.ffn_alpha.shape == ()
    torch.testing.assert_close(model.thresholds(), torch.full((2, 2), 0.3))
    torch.testing.assert_close(b.attn.temperature_leaf, torch.full((2, 16), math.log(0.05)))  # stored as log t
    raw = tiny("SM(t)+ScFuFFN", temperature_param="raw", temperature_init=0.05).transformer.h[0].attn
    assert raw.temperature_leaf is raw.temperature and torch.all(raw.temperature == 0.05)
    assert not parametrize.is_parametrized(raw, "temperature")
    assert "transformer.h.0.attn.causal" not in model.state_dict()  # rebuilt, never saved
    assert torch.equal(b.attn.causal, torch.ones(16, 16, dtype=torch.bool).tril())


def test_gelu_is_the_tanh_approximation_and_relu_is_relu():
    for preset, act in (("SM+LN+G", lambda z: torch.nn.functional.gelu(z, approximate="tanh")),
                        ("SM+LN+R", torch.relu)):
        mlp = tiny(preset).transformer.h[0].mlp
        x = torch.randn(3, 32) * 3
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), mlp.c_proj(act(mlp.c_fc(x))))
    assert tiny("SM+LN+G").transformer.h[0].mlp.c_fc.out_features == 4 * 32


def test_dropout_acts_in_training_only_and_everywhere_it_is_configured():
    model = tiny("SM+LN+G", dropout=0.5)
    idx = tokens(model.config)
    model.eval()
    with torch.no_grad():
        a, b = model(idx).logits, model(idx, return_attention=True).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        c = model(idx).logits
        torch.manual_seed(1)
        d = model(idx).logits
        torch.manual_seed(0)
        e = model(idx).logits
        f = model(idx, return_attention=True).logits
    assert not torch.allclose(c, d) and torch.equal(c, e)  # random, and from torch's generator
    assert not torch.allclose(f, a, atol=1e-3)  # the explicit path drops too


def test_forward_outputs_depend_on_what_was_asked():
    model = tiny("SM+LN+G").eval()
    idx = tokens(model.config)
    plain = model(idx)
    assert plain.head_entropy is None and plain.attentions is None and plain.cache == {} and plain.loss is None
    ent = model(idx, return_entropy=True)
    assert ent.head_entropy.shape == (2, 2) and ent.attentions is None and ent.cache == {}
    att = model(idx, return_attention=True)
    torch.testing.assert_close(ent.head_entropy, att.head_entropy, rtol=1e-4, atol=1e-5)
    assert sorted(att.cache) == ["blocks.0.attn.hook_entropy", "blocks.0.attn.hook_pattern",
                                 "blocks.1.attn.hook_entropy", "blocks.1.attn.hook_pattern"]
    assert att.cache["blocks.0.attn.hook_pattern"] is att.attentions[0]
    torch.testing.assert_close(att.head_entropy[0], row_entropy(att.attentions[0]).mean(dim=(0, 2)))
    short = model(idx[:, :5], return_attention=True)  # shorter than the context: positions 0..4
    torch.testing.assert_close(short.logits, att.logits[:, :5], rtol=1e-5, atol=1e-5)
    msg = _err(lambda: model(torch.zeros(1, 17, dtype=torch.long)))
    assert msg == "sequence length 17 exceeds the model's context block_size=16; pass at most 16 tokens"


def test_cross_entropy_is_the_mean_over_targets_and_ignores_minus_one():
    model = tiny("SM+LN+G").eval()
    idx = tokens(model.config)
    tgt = torch.roll(idx, -1, 1)
    with torch.no_grad():
        out = model(idx, targets=tgt)
        logp = torch.log_softmax(out.logits.double(), -1)
        want = -logp.gather(-1, tgt[..., None]).mean()
        torch.testing.assert_close(out.ce_loss.double(), want, rtol=1e-5, atol=1e-6)
        masked = tgt.clone()
        masked[:, 8:] = -1
        want_masked = -logp[:, :8].gather(-1, tgt[:, :8, None]).mean()
        torch.testing.assert_close(model(idx, targets=masked).ce_loss.double(), want_masked, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(idx[:, :-1], targets=idx[:, 1:]).loss, model(idx[:, :-1], targets=idx[:, 1:].clone()).loss)


def test_parameter_counts_exclude_positions_only_when_asked():
    model = tiny("SM+LN+G")
    total = sum(p.numel() for p in model.parameters())  # the tied head counted once
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - model.transformer.wpe.weight.numel()


def test_weight_decay_applies_exactly_to_the_weight_matrices():
    model = tiny("EReg(SM(t)+ScFuFFN)", weight_norm="qk", bias=True, norm="layernorm")
    groups = model.optim_groups(0.25)
    assert [g["weight_decay"] for g in groups] == [0.25, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    for n, p in model.named_parameters():
        exempt = p.dim() < 2 or "temperature" in n or n.endswith("original0")
        assert (n in no_decay) == exempt and (n in decay) == (not exempt), n
    assert any(n.endswith("original1") for n in decay)  # weight norm's direction V decays, its g does not
    frozen = tiny("SM+LN+G")
    frozen.transformer.wpe.weight.requires_grad_(False)
    assert all(p is not frozen.transformer.wpe.weight for g in frozen.optim_groups(0.1) for p in g["params"])


def test_generation_appends_tokens_greedily_at_top_k_1_and_slides_the_context():
    model = tiny("SM+LN+G").eval()
    idx = tokens(model.config, B=2)[:, :10]
    out = model.generate(idx, 12, top_k=1)  # 22 tokens: more than the 16-token context
    assert out.shape == (2, 22) and torch.equal(out[:, :10], idx)
    seq = idx
    for _ in range(12):  # greedy by hand, on the last block_size tokens
        nxt = model(seq[:, -16:]).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(idx, 4, temperature=0.0), seq[:, :14])  # t -> 0 is greedy too
    torch.manual_seed(5)
    a = model.generate(idx, 6, temperature=5.0)
    torch.manual_seed(5)
    b = model.generate(idx, 6, temperature=5.0)
    assert torch.equal(a, b) and not torch.equal(a, seq[:, :16])


# ---------------------------------------------------------------------------------------
# The analytic PI cost (pi/cost.py): every number and the text that prints it


def test_nonlinear_ops_print_in_the_papers_notation():
    from piformer.pi.cost import NonlinearOp

    ops = [NonlinearOp("softmax", 144, (128, 128)), NonlinearOp("layernorm", 24, (128, 768)),
           NonlinearOp("gelu", 12, (128, 3072)), NonlinearOp("relu", 1, (5, 7))]
    assert [op.paper_str() for op in ops] == [
        "SM:144xR^{128x128}", "LN:24xR^{128x768}", "G:12xR^{128x3072}", "R:1xR^{5x7}"]
    assert [op.elements for op in ops] == [144 * 128 * 128, 24 * 128 * 768, 12 * 128 * 3072, 35]


@pytest.mark.parametrize("flops, printed", [
    (1_244_999_999, "1.2B"), (1_245_000_000, "1.3B"), (1_249_999_999, "1.3B"), (7_247_757_312, "7.3B"),
    (7_240_000_000, "7.2B"), (950_000_000, "1.0B"), (0, "0.0B"), (14_495_514_624, "14.5B"),
])
def test_paper_billions_rounds_half_up_twice(flops, printed):
    from piformer.pi.cost import paper_billions

    assert paper_billions(flops) == printed


def test_cost_counts_every_term_for_a_small_shape():
    from piformer.pi.cost import pi_cost

    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=8, block_size=10, vocab_size=11,
                      attn_temperature=True, ffn_scale=True, ffn="fused", ffn_act="none", norm="none")
    c = pi_cost(cfg, 6, preset="mine")
    L, H, d, T, V = 3, 2, 8, 6, 11
    assert (c.preset, c.n_layer, c.n_head, c.n_embd, c.seq_len, c.vocab_size) == ("mine", L, H, d, T, V)
    assert c.macs == {"qkvo_projections": 4 * T * d * d * L, "attention_scores": T * T * d * L,
                      "attention_values": T * T * d * L, "ffn": T * d * d * L,
                      "blocks_total": (4 * T * d * d + 2 * T * T * d + T * d * d) * L}
    assert c.elementwise == {"temperature_scaling": H * T * (d // H) * L, "ffn_beta_scaling": T * d * L}
    assert c.embedding_macs == T * V * d and c.head_macs == T * d * V
    assert c.ffn_flops == 2 * T * d * d * L and c.attn_flops == 8 * T * d * d * L + 3 * T * T * d * L
    assert c.nonlinear_str() == "SM:6xR^{6x6}"
    assert pi_cost(cfg).seq_len == 10 and pi_cost(cfg, None).seq_len == 10  # default: the block size
    plain = pi_cost(ModelConfig.from_preset("SM+LN+G", size="tiny"))
    assert plain.elementwise == {} and plain.nonlinear_str() == "SM:4xR^{16x16}, LN:4xR^{16x32}, G:2xR^{16x128}"
    assert _err(lambda: pi_cost(cfg, -1)) == "seq_len must be a positive integer, got -1"
    assert _err(lambda: pi_cost(cfg, 11)) == "seq_len=11 exceeds the model's block_size=10"


def test_cost_as_json_holds_the_paper_strings_and_every_count():
    from piformer.pi.cost import pi_cost

    d = pi_cost(ModelConfig.from_preset("SM+LN+R", size="gpt2-small"), preset="SM+LN+R").to_dict()
    assert d["ffn_flops_paper"] == "14.5B" and d["attn_flops_paper"] == "7.7B" and d["preset"] == "SM+LN+R"
    assert d["nonlinear"][0] == {"kind": "softmax", "count": 144, "shape": (128, 128),
                                 "elements": 144 * 128 * 128, "paper": "SM:144xR^{128x128}"}
    assert d["nonlinear"][2]["paper"] == "R:12xR^{128x3072}"
    assert d["final_layernorm"] == {"kind": "layernorm", "count": 1, "shape": (128, 768), "elements": 128 * 768}
    assert d["macs"]["blocks_total"] == sum(v for k, v in d["macs"].items() if k != "blocks_total")


def test_the_papers_row_is_found_only_for_its_own_shape():
    from piformer.pi.cost import PAPER_TABLES, paper_row

    small = ModelConfig.from_preset("SM+LN+G", size="gpt2-small")
    assert paper_row("SM+LN+G", small, 128) == ("2", PAPER_TABLES["2"]["rows"]["SM+LN+G"])
    assert paper_row("SM+ScFuFFN", small, 256)[0] == "6"
    assert paper_row("SM+LN+R", small, 512)[0] == "3"
    assert paper_row("SM+LN+G", ModelConfig.from_preset("SM+LN+G", size="gpt2-18l"), 128)[0] == "7"
    assert paper_row("SM+LN+G", small, 64) is None
    assert paper_row("SM+G", small, 128) is None  # not a row the paper printed
    assert paper_row("SM+LN+G", ModelConfig.from_preset("SM+LN+G", size="cpu-small"), 128) is None


def test_cost_table_prints_every_number():
    from piformer.pi.cost import format_cost, pi_cost

    cfg = ModelConfig.from_preset("SM(t)+ScFuFFN", size="gpt2-small")
    text = format_cost(pi_cost(cfg, preset="SM(t)+ScFuFFN"))
    lines = text.splitlines()
    assert lines[0] == "architecture SM(t)+ScFuFFN: L=12 H=12 d=768 T=128 V=50304"
    assert "  softmax      144 x R^(128 x 128)        2,359,296 elements   [SM:144xR^{128x128}]" in lines
    assert "  (final LayerNorm: 1 x R^(128 x 768), not counted by the paper)" in lines
    assert "  FFN      1.8B   (1,811,939,328)" in lines and "  Attn     7.7B   (7,700,742,144)" in lines
    assert any(line.startswith("  qkvo_projections") and line.endswith("3,623,878,656") for line in lines)
    assert any(line.startswith("  embedding (1-hot)") and "(T x V x d; a plaintext lookup is free)" in line for line in lines)
    assert any(line.startswith("  temperature_scaling") and "(elementwise products)" in line for line in lines)
    assert "architecture (from config):" in format_cost(pi_cost(cfg))


def test_model_config_is_found_in_a_run_a_checkpoint_or_a_file(tmp_path):
    import json

    from piformer.pi.cost import load_model_config

    cfg = ModelConfig.from_preset("SM+ScFuFFN", size="tiny")
    for rel in ("checkpoints/last/config.json", "checkpoints/best/config.json", "config.json"):
        f = tmp_path / "run" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        want = {"checkpoints/last/config.json": 2, "checkpoints/best/config.json": 3, "config.json": 5}[rel]
        body = {**cfg.to_dict(), "n_layer": want}
        f.write_text(json.dumps({"model": body} if rel == "config.json" else body))
        assert load_model_config(tmp_path / "run").n_layer == want  # the run's config.json, then best, then last
    assert load_model_config(tmp_path / "run" / "checkpoints" / "last" / "config.json") == cfg
    assert load_model_config(tmp_path / "run" / "checkpoints" / "best").n_layer == 3
    with pytest.raises(FileNotFoundError, match="no such run directory or file: "):
        load_model_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config.json in .*empty \(looked at: .*config.json"):
        load_model_config(tmp_path / "empty")


# ---------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_files_hold_the_weights_once_and_say_what_they_are(tmp_path):
    import json
    import os

    from safetensors import safe_open

    from piformer.checkpoint import load_trainer_state, save_checkpoint

    model = tiny("SM+LN+G")
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "run" / "ck", model)  # parent created
    finally:
        os.umask(old)
    assert path == tmp_path / "run" / "ck" and sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert load_trainer_state(path) is None
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "library": "piformer"}
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
    assert json.loads((path / "config.json").read_text()) == model.config.to_dict()
    assert (path / "config.json").read_text().endswith("}\n")
    assert oct(path.stat().st_mode & 0o777) == "0o755"
    assert {oct(f.stat().st_mode & 0o777) for f in path.iterdir()} == {"0o644"}


class _Wrapper(torch.nn.Module):
    def __init__(self, inner, attr):
        super().__init__()
        setattr(self, attr, inner)


@pytest.mark.parametrize("attr", ["module", "_orig_mod"])
def test_wrapped_models_are_saved_as_the_model_inside(tmp_path, attr):
    """DDP keeps the model in .module, torch.compile in ._orig_mod: the checkpoint must hold
    the bare model's names (no 'module.' prefix), loadable by load_model."""
    from piformer.checkpoint import load_model, save_checkpoint

    model = tiny("SM(t)+ScFuFFN")
    save_checkpoint(tmp_path / "ck", _Wrapper(model, attr))
    loaded = load_model(tmp_path / "ck")
    idx = tokens(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model.eval()(idx).logits)
    assert not loaded.training


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    import os

    from piformer import checkpoint as ck

    model = tiny("SM")
    ck.save_checkpoint(tmp_path / "last", model, trainer_state={"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path / "last", model, trainer_state={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["last"]
    assert ck.load_trainer_state(tmp_path / "last")["step"] == 1


def test_resolution_prefers_the_requested_checkpoint_and_recovers_old_ones(tmp_path):
    import os

    from piformer.checkpoint import resolve_checkpoint, save_checkpoint

    model = tiny("SM")
    ck = tmp_path / "run" / "checkpoints"
    save_checkpoint(ck / "best", model)
    assert resolve_checkpoint(tmp_path / "run", which="last") == ck / "best"  # no last: best
    save_checkpoint(ck / "last", model)
    assert resolve_checkpoint(tmp_path / "run", which="last") == ck / "last"
    assert resolve_checkpoint(tmp_path / "run") == ck / "best"
    os.replace(ck / "best", ck / "best.old")  # a kill between the two renames of a save of best
    assert resolve_checkpoint(tmp_path / "run") == ck / "best.old"
    assert resolve_checkpoint(ck / "best") == ck / "best.old"
    assert resolve_checkpoint(ck / "last") == ck / "last"


def test_unreadable_checkpoint_parts_are_value_errors_naming_the_file(tmp_path):
    from piformer.checkpoint import load_config, load_trainer_state, save_checkpoint

    model = tiny("SM")
    save_checkpoint(tmp_path / "ck", model, trainer_state={"step": 3, "t": torch.arange(4)})
    state = load_trainer_state(tmp_path / "ck", mmap=True)
    assert state["step"] == 3 and torch.equal(state["t"], torch.arange(4))
    (tmp_path / "ck" / "trainer_state.pt").write_bytes(b"\x80\x02torn")
    with pytest.raises(ValueError, match=r"corrupt checkpoint .*ck: cannot read trainer_state.pt \("):
        load_trainer_state(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"corrupt checkpoint .*ck: config.json is not valid JSON \("):
        load_config(tmp_path / "ck")


# ---------------------------------------------------------------------------------------
# Training helpers (train.py) that the end-to-end tests exercise only in passing


def test_warmup_is_a_fraction_below_one_and_a_step_count_from_one():
    from piformer.train import lr_at, warmup_steps

    assert warmup_steps(TrainConfig(max_steps=10, warmup=0.25)) == 2  # round(2.5) -> 2 (banker's)
    assert warmup_steps(TrainConfig(max_steps=10, warmup=0.35)) == 4
    assert warmup_steps(TrainConfig(max_steps=10, warmup=1)) == 1
    assert warmup_steps(TrainConfig(max_steps=10, warmup=3.7)) == 3
    assert warmup_steps(TrainConfig(max_steps=10, warmup=0)) == 0
    no_warm = TrainConfig(max_steps=4, warmup=0, lr=1.0, min_lr=0.0)
    assert [lr_at(s, no_warm) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    only_warm = TrainConfig(max_steps=3, warmup=5, lr=1.0)
    assert [lr_at(s, only_warm) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0], abs=1e-15)
    cos = TrainConfig(max_steps=4, warmup=0, lr=1.0, min_lr=0.2, schedule="cosine")
    assert lr_at(0, cos) == 1.0 and lr_at(4, cos) == pytest.approx(0.2) and lr_at(9, cos) == pytest.approx(0.2)
    assert lr_at(1, cos) == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi / 4)))
    assert lr_at(9, no_warm) == 0.0  # past the end: held at min_lr, never below


def test_single_process_defaults_and_devices(monkeypatch):
    from piformer import train as tr

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = tr._setup_dist("cpu")
    assert (d.rank, d.local_rank, d.world, d.created, d.master, d.on) == (0, 0, 1, False, True, False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert tr._setup_dist("cpu") == tr._Dist()
    assert tr._Dist(rank=1, world=2).master is False and tr._Dist(world=2).on is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tr._resolve_device(TrainConfig(device="auto"), d) == torch.device("cpu")
    assert tr._resolve_device(TrainConfig(device="cpu"), d) == torch.device("cpu")
    assert "TrainConfig.device='cuda' but no CUDA device is available" in _err(
        lambda: tr._resolve_device(TrainConfig(device="cuda"), d))
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert tr._autocast_dtype(TrainConfig(dtype="auto"), cpu) is None
    assert tr._autocast_dtype(TrainConfig(dtype="auto"), cuda) is torch.bfloat16
    assert tr._autocast_dtype(TrainConfig(dtype="bf16"), cpu) is torch.bfloat16
    assert tr._autocast_dtype(TrainConfig(dtype="fp16"), cuda) is torch.float16
    assert tr._autocast_dtype(TrainConfig(dtype="fp32"), cuda) is None
    assert "TrainConfig.dtype='fp16' needs CUDA" in _err(lambda: tr._autocast_dtype(TrainConfig(dtype="fp16"), cpu))


def test_mixed_seeds_are_stable_64_bit_and_order_sensitive():
    from piformer.train import _mix_seed

    a = _mix_seed(1337, 5, 0)
    assert a == _mix_seed(1337, 5, 0) and 0 <= a < 2**64 and a >= 2**32  # uses the full width
    assert len({a, _mix_seed(1337, 0, 5), _mix_seed(1337, 5, 1), _mix_seed(1338, 5, 0)}) == 4


def test_model_and_threshold_statistics_for_the_metrics(tmp_path):
    from piformer.train import _model_stats, _pattern_params

    model = tiny("EReg(SM(t)+ScFuFFN)", temperature_param="raw")
    with torch.no_grad():
        model.transformer.h[0].attn.reg_threshold.copy_(torch.tensor([0.2, 0.6]))
        model.transformer.h[1].attn.temperature[:, :4] = -1.0
    s = _model_stats(model)
    assert s["thresholds"] == [[pytest.approx(0.2), pytest.approx(0.6)], [0.5, 0.5]]
    assert s["threshold_stats"]["mean"] == [pytest.approx(0.4), 0.5]
    assert s["threshold_stats"]["std"] == [pytest.approx(0.2 * math.sqrt(2)), 0.0]  # unbiased std of 2 values
    t = s["temperature"]
    assert t["min"] == [pytest.approx(0.01), -1.0] and t["max"] == [pytest.approx(0.01), pytest.approx(0.01)]
    assert t["frac_nonpos"] == [0.0, 0.25] and t["mean"][0] == pytest.approx(0.01) and t["std"][0] == pytest.approx(0)
    assert t["mean"][1] == pytest.approx(0.25 * -1.0 + 0.75 * 0.01)
    assert _model_stats(tiny("SM+LN+G")) == {}
    m = tiny("SM(t)+ScFuFFN")
    ids = {id(p) for p in _pattern_params(m)}
    picked = {n for n, p in m.named_parameters() if id(p) in ids}
    assert picked == {f"transformer.h.{l}.attn.{x}" for l in range(2)
                      for x in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                                "parametrizations.temperature.original")}


def test_regulariser_gradient_ratio_is_the_ratio_of_the_two_gradient_norms():
    from piformer.train import _pattern_params, reg_grad_ratio

    model = tiny("EReg(SM(t)+ScFuFFN)")
    _sharpen(model)
    idx = tokens(model.config)
    reg = RegLoss(lam=0.5)
    r = reg_grad_ratio(model, idx, idx, reg)
    assert all(p.grad is None for p in model.parameters())  # .grad left alone
    params = _pattern_params(model)
    o = model(idx, idx, reg=reg)
    g_ce = torch.autograd.grad(o.ce_loss, params, retain_graph=True)
    g_reg = torch.autograd.grad(0.5 * o.reg_loss, params)
    n = lambda gs: math.sqrt(sum(float(g.square().sum()) for g in gs))  # noqa: E731
    assert r["ce_grad_norm"] == pytest.approx(n(g_ce), rel=1e-4)
    assert r["reg_grad_norm"] == pytest.approx(n(g_reg), rel=1e-4) and r["reg_grad_norm"] > 0
    assert r["reg_grad_ratio"] == pytest.approx(r["reg_grad_norm"] / r["ce_grad_norm"], rel=1e-9)


def test_resume_checks_name_what_differs():
    from piformer.train import _check_resume_compatible, _model_diff

    a = ModelConfig.from_preset("SM+LN+G", size="tiny")
    b = ModelConfig.from_preset("SM+LN+R", size="tiny", n_layer=3)
    assert _model_diff(a, b) == [("n_layer", 2, 3), ("ffn_act", "gelu", "relu")]
    assert _model_diff(a, a) == []
    saved = {"model": a.to_dict(), "data": {"fingerprint": {"train_sha256": "x", "tokenizer_sha256": "t"}}}
    _check_resume_compatible(saved, a, {"train_sha256": "x", "tokenizer_sha256": "t"})
    _check_resume_compatible({"model": a.to_dict()}, a, {})  # an old run without fingerprints
    assert _err(lambda: _check_resume_compatible(saved, b, {})) == (
        "--resume with a different model config than the run's: n_layer: 2 -> 3; ffn_act: 'gelu' -> 'relu'")
    assert _err(lambda: _check_resume_compatible(saved, a, {"train_sha256": "y", "tokenizer_sha256": "u"})) == (
        "--resume with different data than the run was trained on (train_sha256, tokenizer_sha256 changed)")
    assert "(tokenizer_sha256 changed)" in _err(
        lambda: _check_resume_compatible(saved, a, {"train_sha256": "x", "tokenizer_sha256": "u"}))


def test_non_string_values_for_string_fields_and_bools_for_int_fields():
    """A JSON number where a string is expected is read as its text (then validated); a JSON
    true where an int is expected becomes the int 1, never a bool that prints as 'True'."""
    assert _err(lambda: ModelConfig.from_dict({"weight_norm": 1})) == (
        "ModelConfig.weight_norm: unknown group '1' in '1'; valid groups: qk, qkv, qkvo, ffn "
        "(joined with '+', e.g. 'qk+ffn')")
    got = ModelConfig.from_dict({"n_layer": True}).n_layer
    assert got == 1 and type(got) is int


@dataclasses.dataclass
class _PartlyDocumented:
    undocumented: int = 1
    documented: int = 5
    """Has a docstring."""


def test_field_docs_take_only_string_statements_under_a_field():
    """A field without a docstring gets none (not the next field's default)."""
    from piformer.config import field_docs

    assert field_docs(_PartlyDocumented) == {"documented": "Has a docstring."}


def test_overload_in_the_last_layer_of_a_model_deeper_than_wide():
    T = 16
    lt = math.log(T)
    d = diagnose(torch.tensor([[0.5 * lt, 0.5 * lt], [0.5 * lt, 0.5 * lt], [0.9 * lt, 0.9 * lt]]), T)
    assert d.overloaded_layers == [2] and d.overloaded_heads == [(2, 0), (2, 1)]


def test_uniform_causal_entropy_under_a_sliding_window():
    from piformer.entropy import uniform_causal_entropy

    T, w = 10, 4
    want = sum(math.log(min(i + 1, w)) for i in range(T)) / T
    assert uniform_causal_entropy(T, window=w) == pytest.approx(want, rel=1e-12)
    assert uniform_causal_entropy(T, w) < uniform_causal_entropy(T)


def test_causal_row_ceiling_accepts_any_positive_window_and_names_a_bad_one():
    from piformer.entropy import causal_row_ceiling

    assert torch.equal(causal_row_ceiling(4, window=1), torch.zeros(4, dtype=torch.float64))  # one key: no entropy
    torch.testing.assert_close(causal_row_ceiling(5, window=3), torch.tensor([1.0, 2, 3, 3, 3], dtype=torch.float64).log())
    torch.testing.assert_close(causal_row_ceiling(3), torch.tensor([1.0, 2, 3], dtype=torch.float64).log())
    assert _err(lambda: causal_row_ceiling(4, window=0)) == (
        "window must be a positive number of keys (or None for full causal attention), got 0")


def test_penalty_uses_the_e_max_it_is_given():
    """A given E_max (e.g. log of a sliding window) replaces log T in target and band."""
    theta = torch.full((1, 1), 0.5)
    e = torch.tensor([[math.log(4.0)]])  # exactly on target 0.5 * log 16; far from 0.5 * log 4
    assert entropy_penalty(e, theta, 16, 0.1).item() == pytest.approx(0.0, abs=1e-12)
    assert entropy_penalty(e, theta, 16, 0.1, e_max=math.log(4.0)).item() == pytest.approx((0.5 * math.log(4.0)) ** 2)
