"""The fused attention-with-entropy path against the explicit (B, H, T, T) path, its oracle."""

import math
import shutil
import warnings

import pytest
import torch

from piformer import attention
from piformer.attention import KERNELS, attention_with_entropy, entropy_kernel, fused_entropy_unsupported
from piformer.kernels import KernelUnavailable
from piformer.config import ARCH_PRESETS, ModelConfig, RegLoss
from piformer.model import ENTROPY, EXPLICIT, PiGPT

TOL = dict(atol=1e-5, rtol=1e-5)


def random_model(preset: str, seed: int = 0, **kw) -> PiGPT:
    """A tiny model whose attention is far from uniform: weights drawn 10x wider than the init,
    temperatures and thresholds spread out, so entropies and their gradients differ row by row."""
    torch.manual_seed(seed)
    model = PiGPT(ModelConfig.from_preset(preset, size="tiny", **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
        for block in model.transformer.h:
            if block.attn.temperature is not None:
                block.attn.set_temperature(torch.empty(block.attn.temperature.shape).uniform_(0.3, 2.0))
            if block.attn.reg_threshold is not None:
                block.attn.reg_threshold.uniform_(0.0, 1.0)
    # Eval mode only so that spectral norm does not take a power-iteration step per forward (the
    # two paths must see the same weights); with dropout 0 the forward is the training forward.
    return model.eval()


def tokens(cfg: ModelConfig, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def grads(model: PiGPT) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def objective(model: PiGPT, idx, tgt, explicit: bool, weights: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The training loss (with a strong per-row regulariser for EReg) plus a weighted sum of the
    head entropies, so every preset's entropy gradient is exercised."""
    reg = RegLoss(lam=0.5, gamma=0.05, mode="query", reduction="sum")
    out = model(idx, targets=tgt, reg=reg, return_entropy=not explicit, return_attention=explicit)
    return out.loss + (weights * out.head_entropy).sum(), out


@pytest.mark.parametrize("preset", list(ARCH_PRESETS))
def test_loss_entropies_and_every_gradient_match_the_explicit_path(preset):
    model = random_model(preset)
    idx, tgt = tokens(model.config)
    weights = torch.randn(model.config.n_layer, model.config.n_head)
    results = {}
    for explicit in (True, False):
        total, out = objective(model, idx, tgt, explicit, weights)
        total.backward()
        results[explicit] = (total.detach(), out, grads(model))
    (t_e, o_e, g_e), (t_f, o_f, g_f) = results[True], results[False]
    assert o_f.attentions is None  # the fused path kept no probabilities
    torch.testing.assert_close(t_f, t_e, **TOL)
    torch.testing.assert_close(o_f.loss, o_e.loss, **TOL)
    torch.testing.assert_close(o_f.head_entropy, o_e.head_entropy, **TOL)
    if model.config.entropy_reg:
        torch.testing.assert_close(o_f.reg_loss, o_e.reg_loss, **TOL)
        assert o_e.reg_outside > 0  # the penalty is active, so its gradient is in the comparison
    assert g_f.keys() == g_e.keys() and len(g_e) == len(list(model.parameters()))
    for name in g_e:
        torch.testing.assert_close(g_f[name], g_e[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("preset", ["SM+LN+G", "EReg(SM(t)+ScFuFFN)"])
def test_row_entropies_and_their_gradients_match_per_row(preset, kernel, monkeypatch):
    """One attention layer, random upstream gradients on the output and on every row's entropy."""
    monkeypatch.setenv(attention.KERNEL_ENV, kernel)
    model = random_model(preset)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, model.config.block_size, model.config.n_embd, requires_grad=True)
    g_y = torch.randn(2, model.config.block_size, model.config.n_embd)
    g_h = torch.randn(2, model.config.n_head, model.config.block_size)
    res = {}
    for mode in (EXPLICIT, ENTROPY):
        y, probs, row_ent = attn(x, mode)
        ((y * g_y).sum() + (row_ent * g_h).sum()).backward()
        res[mode] = (y.detach(), row_ent.detach(), x.grad.clone(), grads(model))
        x.grad = None
        assert (probs is None) == (mode == ENTROPY)
    for a, b in zip(res[ENTROPY][:3], res[EXPLICIT][:3]):
        torch.testing.assert_close(a, b, **TOL)
    for name, g in res[EXPLICIT][3].items():
        torch.testing.assert_close(res[ENTROPY][3][name], g, **TOL)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("T", [1, 24, 64, 150])  # the C++ kernel's query tiles are 64 rows
def test_kernel_agrees_with_float64_reference_including_row_zero(kernel, T):
    """Peaked and flat rows, against an independent float64 computation; row 0 has entropy 0."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64) * s for s in (4.0, 1.0, 1.0))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    y, ent = attention_with_entropy(q, k, v, kernel=kernel)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    logp = s.log_softmax(-1)
    p = logp.exp()
    ref_ent = -(p * logp.nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(y, p @ v, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ent, ref_ent, atol=1e-12, rtol=1e-10)
    assert ent[..., 0].abs().max() < 1e-12
    g = torch.randn_like(ent)
    got = torch.autograd.grad((ent * g).sum() + y.sum(), (q, k, v))
    want = torch.autograd.grad((ref_ent * g).sum() + (p @ v).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_no_t_by_t_tensor_is_kept_for_backward():
    model = random_model("EReg(SM(t)+ScFuFFN)", block_size=24)  # T != head width 16
    idx, tgt = tokens(model.config)
    T = model.config.block_size
    for mode_kwargs, expect_square in (({}, False), ({"return_attention": True}, True)):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            model(idx, targets=tgt, **mode_kwargs).loss.backward()
        model.zero_grad(set_to_none=True)
        square = [s for s in shapes if len(s) >= 2 and s[-2:] == (T, T)]
        assert bool(square) == expect_square, square


def test_fallbacks_warn_once_and_match_where_they_apply(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    assert fused_entropy_unsupported(torch.zeros(1, 1, 2, 2)) is None
    assert "dtype" in fused_entropy_unsupported(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16))
    assert "dropout" in fused_entropy_unsupported(torch.zeros(1, 1, 2, 2), 0.1)
    model = random_model("EReg(SM(t)+ScFuFFN)", dropout=0.1).train()
    idx, tgt = tokens(model.config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # training with dropout: explicit path, one warning
            out = model(idx, targets=tgt)
            assert torch.isfinite(out.loss)
        model.eval()  # no dropout in eval: the fused path, no further warning
        model(idx, return_entropy=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "dropout" in messages[0], messages
    with pytest.raises(ValueError, match="dtype"):
        attention_with_entropy(*(torch.zeros(1, 1, 4, 2, dtype=torch.float16),) * 3)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on PATH: the C++ kernel cannot be built")
def test_the_cpp_kernel_builds_and_is_the_default_where_a_compiler_exists(monkeypatch):
    monkeypatch.delenv(attention.KERNEL_ENV, raising=False)
    assert entropy_kernel() == "cpp"


def test_an_unknown_kernel_is_refused_with_the_valid_names(monkeypatch):
    monkeypatch.setenv(attention.KERNEL_ENV, "triton")
    with pytest.raises(ValueError, match="'triton'.*valid: cpp, flash"):
        attention_with_entropy(*(torch.zeros(1, 1, 4, 2),) * 3)


def test_a_kernel_that_cannot_be_built_falls_back_to_flash_once_with_the_reason(monkeypatch):
    def no_compiler(source):
        raise KernelUnavailable("building csrc/entropy_attention.cpp failed: c++: not found")

    monkeypatch.delenv(attention.KERNEL_ENV, raising=False)
    monkeypatch.setattr(attention, "load_kernel", no_compiler)
    monkeypatch.setattr(attention, "_warned", set())
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 4) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [attention_with_entropy(q, k, v) for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "c++: not found" in messages[0] and "flash" in messages[0], messages
    want = attention_with_entropy(q, k, v, kernel="flash")
    for y, ent in got:
        torch.testing.assert_close(y, want[0])
        torch.testing.assert_close(ent, want[1])


def test_a_missing_kernel_source_is_reported_not_crashed():
    with pytest.raises(KernelUnavailable, match="no_such_kernel"):
        attention.load_kernel("no_such_kernel")


def test_the_kernels_agree_on_strided_inputs_as_the_model_lays_them_out():
    """q, k and v as views into one (B, T, 3C) tensor transposed to (B, H, T, D), not contiguous."""
    torch.manual_seed(4)
    B, T, H, D = 3, 100, 4, 16
    qkv = torch.randn(B, T, 3 * H * D, dtype=torch.float64, requires_grad=True)
    outs = {}
    for kernel in KERNELS:
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, -1))
        assert not any(t.is_contiguous() for t in (q, k, v))
        y, ent = attention_with_entropy(q, k, v, kernel=kernel)
        (g,) = torch.autograd.grad((y * y).sum() + (ent * torch.arange(T)).sum(), qkv)
        outs[kernel] = (y, ent, g)
    for a, b in zip(outs["cpp"], outs["flash"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_collapsed_attention_never_reports_a_negative_entropy():
    """Logits of ~1e4 (the deep layers of a model without LayerNorm reach them): the fused
    entropy is a difference of two terms that large, and float32 rounding once logged -0.19 nats
    in training. Entropies are clamped at 0 and stay within rounding of the float64 reference."""
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 64, 32
    q, k, v = torch.randn(B, H, T, D) * 60, torch.randn(B, H, T, D) * 60, torch.randn(B, H, T, D)
    _, ent = attention_with_entropy(q, k, v)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    assert s.abs().max() > 5e3
    p = torch.softmax(s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), -1)
    ref = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    assert ent.min() >= 0
    assert (ent.double() - ref).abs().max() < 1e-2
