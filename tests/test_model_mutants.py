"""Tests written against the mutants of model.py that the first mutation run left alive (issue 14).

Each test compares the model with an independent computation done here in plain PyTorch
(attention built by hand from the q, k, v projections, the embedding sum read off the tables)
or pins a contract the attention modes promise: a plain forward never builds the (T, T)
probabilities nor the entropies, attention dropout acts in training on every path, the entropy
path falls back (and says why) when its fused kernel cannot run. The mutants each test kills
are named in its docstring (tools/mutation.sh --survivors model).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from piformer import attention
from piformer.model import ENTROPY, EXPLICIT, FAST, PiGPT
from tiny_runs import tiny, tokens


def _randomise(model: PiGPT, seed: int = 3) -> None:
    """Non-zero biases and wider q/k weights: a mistake in the bias layout or the score scale
    then changes the output by far more than rounding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif ".q_proj." in name or ".k_proj." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)


def _by_hand(attn, x: torch.Tensor):
    """Causal softmax(q k^T / sqrt(D)) v through c_proj, from the three projections' own
    weights: no fused qkv weight, no SDPA, no masked_fill. Returns output, probs, row entropies."""
    B, T, C = x.shape
    H = attn.n_head
    D = C // H
    q, k, v = (F.linear(x, p.weight, p.bias).view(B, T, H, D).transpose(1, 2)
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
    ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    y = torch.einsum("bhij,bhjd->bhid", probs, v).transpose(1, 2).reshape(B, T, C)
    return F.linear(y, attn.c_proj.weight, attn.c_proj.bias), probs, ent


# ---------------------------------------------------------------------------------------
# Attention against a hand computation


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", [FAST, ENTROPY, EXPLICIT])
def test_every_attention_path_is_the_hand_computed_causal_softmax(mode, bias):
    """All three paths equal attention built by hand from q_proj, k_proj, v_proj, with random
    biases and without. A model without attn_temperature has no temperature dividing the scores
    (__init___34: a temperature always created)."""
    model = tiny(bias=bias).eval()
    _randomise(model)
    attn = model.transformer.h[0].attn
    assert attn.temperature is None
    assert not any("temperature" in n for n, _ in model.named_parameters())
    x = torch.randn(2, model.config.block_size, model.config.n_embd, generator=torch.Generator().manual_seed(5))
    ref, ref_probs, ref_ent = _by_hand(attn, x)
    with torch.no_grad():
        y, probs, ent = attn(x, mode)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    if mode == EXPLICIT:
        torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    if mode != FAST:
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# What each mode returns


def _attn_outputs(model: PiGPT, **kw) -> list[tuple]:
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: seen.append(out)) for b in model.transformer.h]
    try:
        with torch.no_grad():
            model(tokens(model.config), **kw)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == model.config.n_layer
    return seen


def test_each_forward_builds_only_the_attention_outputs_it_needs():
    """A plain forward runs the fused path: no (B, H, T, T) probabilities, no entropies (the
    point of FAST: memory and speed). Entropies alone (return_entropy, or the regulariser with
    targets) come from the fused entropy kernel, still without probabilities; only
    return_attention builds them. Kills PiGPT.forward_13/15/17 (the mode chosen wrongly),
    forward_31 and Block.forward_3 (the mode not handed on: explicit everywhere),
    CausalSelfAttention.forward_74 (falling back when the fused kernel could run) and _77
    (probs and row_ent '' instead of None)."""
    model = tiny("EReg(SM(t)+ScFuFFN)").eval()
    T = model.config.block_size
    for _, probs, ent in _attn_outputs(model):
        assert probs is None and ent is None
    for kw in ({"return_entropy": True}, {"targets": tokens(model.config, seed=2)}):
        for _, probs, ent in _attn_outputs(model, **kw):
            assert probs is None
            assert ent.shape == (2, model.config.n_head, T)
    for _, probs, ent in _attn_outputs(model, return_attention=True):
        assert probs.shape == (2, model.config.n_head, T, T) and ent.shape == (2, model.config.n_head, T)


def test_block_hands_its_mode_to_attention():
    """Block.forward passes the mode through (kills Block.forward_3: mode None, i.e. explicit)."""
    model = tiny().eval()
    block = model.transformer.h[0]
    x = torch.randn(2, model.config.block_size, model.config.n_embd)
    with torch.no_grad():
        _, probs, ent = block(x, FAST)
        assert probs is None and ent is None
        _, probs, ent = block(x, ENTROPY)
        assert probs is None and ent is not None


# ---------------------------------------------------------------------------------------
# Attention dropout, on every path


def _dropout_attn(p: float = 0.5):
    model = tiny(dropout=p)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, model.config.block_size, model.config.n_embd, generator=torch.Generator().manual_seed(9))
    return attn, x


def test_attention_dropout_acts_in_training_on_the_fast_path():
    """SDPA gets the dropout in training (kills forward_4: never dropping, forward_89: dropout_p
    not passed) and none in eval; the fast path never falls back (forward_68)."""
    attn, x = _dropout_attn()
    with torch.no_grad():
        clean = attn.eval()(x, FAST)[0]
        torch.testing.assert_close(attn(x, FAST)[0], clean)
        attn.train()
        torch.manual_seed(0)
        y, probs, ent = attn(x, FAST)
    assert probs is None and ent is None
    assert (y - clean).abs().max() > 1e-3


def test_attention_dropout_in_the_explicit_path_is_dropout_on_the_probabilities():
    """In training the explicit path is dropout(P) v with the configured rate, reproduced here
    from the same seed (kills forward_4); in eval it is P v."""
    attn, x = _dropout_attn()
    attn.train()
    with torch.no_grad():
        _, probs, _ = attn(x, EXPLICIT)
        B, T, C = x.shape
        H, D = attn.n_head, attn.head_dim
        v = attn.v_proj(x).view(B, T, H, D).transpose(1, 2)
        torch.manual_seed(4)
        y = attn(x, EXPLICIT)[0]
        torch.manual_seed(4)
        ref = attn.c_proj((F.dropout(probs, 0.5, True) @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)


def test_entropy_path_falls_back_to_explicit_under_attention_dropout(monkeypatch):
    """The fused entropy kernel has no dropout, so in training with dropout the entropy mode
    must take the explicit path, warn once naming the dropout, and drop exactly as that path
    does. Kills forward_68/69/73 (no fallback: the kernel runs without dropout) and _75 (the
    warning says 'because of None')."""
    monkeypatch.setattr(attention, "_warned", set())
    attn, x = _dropout_attn()
    attn.train()
    with torch.no_grad():
        torch.manual_seed(11)
        ref, ref_probs, ref_ent = attn(x, EXPLICIT)
        torch.manual_seed(11)
        with pytest.warns(RuntimeWarning, match="attention dropout 0.5"):
            y, probs, ent = attn(x, ENTROPY)
        clean = attn.eval()(x, ENTROPY)[0]
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(probs, ref_probs)
    torch.testing.assert_close(ent, ref_ent)
    assert (y - clean).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# Temperature under bf16 autocast


def test_entropies_under_cpu_bf16_autocast_match_the_explicit_path(monkeypatch):
    """TrainConfig.dtype='bf16' runs the forward under CPU autocast: q is bf16 while t stays
    float32. Dividing by t cast to q's dtype keeps q bf16, so the entropy mode falls back to the
    explicit path and gives its entropies (kills forward_65: t not cast, q promoted to float32
    and handed to the fused kernel with bf16 k and v, which fails)."""
    model = tiny("SM(t)+ScFuFFN").eval()
    idx = tokens(model.config)
    monkeypatch.setattr(attention, "_warned", set())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(RuntimeWarning, match="bfloat16"):
        ent = model(idx, return_entropy=True).head_entropy
        ref = model(idx, return_attention=True).head_entropy
    torch.testing.assert_close(ent, ref)


# ---------------------------------------------------------------------------------------
# Embeddings, optimiser groups, devices


def test_first_block_sees_token_plus_position_embeddings():
    """x_0 = wte[idx] + wpe[0..T-1], read off the tables (kills PiGPT.forward_25: wte - wpe)."""
    model = tiny().eval()
    idx = tokens(model.config)[:, :11]
    seen = []
    hook = model.transformer.h[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(idx)
    hook.remove()
    ref = model.transformer.wte.weight[idx] + model.transformer.wpe.weight[: idx.shape[1]]
    torch.testing.assert_close(seen[0], ref)


def test_a_frozen_parameter_leaves_the_others_in_their_groups():
    """A frozen parameter is skipped, not the end of the list (kills optim_groups_3: break)."""
    model = tiny("SM(t)+ScFuFFN")
    model.transformer.wpe.weight.requires_grad_(False)  # the second parameter
    groups = model.optim_groups(0.1)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) == len(list(model.parameters())) - 1
    assert {id(p) for p in grouped} == {id(p) for p in trainable}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on the CPU every tensor is on one device")
def test_forward_on_cuda_builds_positions_on_the_tokens_device():
    """Positions live on idx's device (PiGPT.forward_20/22: torch.arange on the CPU fails
    against CUDA embedding tables). Only a second device can tell; skipped without one."""
    model = tiny().cuda().eval()
    idx = tokens(model.config).cuda()
    with torch.no_grad():
        out = model(idx)
    torch.testing.assert_close(out.logits.cpu(), model.cpu()(idx.cpu()).logits, atol=1e-4, rtol=1e-4)
