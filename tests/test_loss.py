"""The chunked loss (piformer.loss) against F.cross_entropy over full logits, its oracle."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from piformer.config import ARCH_PRESETS, ModelConfig
from piformer.loss import LOSS_ENV, chunked_loss_unsupported, linear_cross_entropy
from piformer.model import PiGPT

TOL = dict(atol=1e-5, rtol=1e-5)


def both(hidden, weight, targets, chunk_rows, scale=1.0):
    """(loss, d hidden, d weight) from the chunked loss and from F.cross_entropy over the logits."""
    out = []
    for chunked in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if chunked:
            loss = linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows)
        else:
            loss = F.cross_entropy(h @ w.t(), targets, ignore_index=-1)
        (loss * scale).backward()
        out.append((loss.detach(), h.grad, w.grad))
    return out


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 40), C=st.integers(1, 9), V=st.integers(2, 30), chunk=st.integers(1, 50),
       ignored=st.floats(0.0, 0.9), scale=st.sampled_from([1.0, 0.25, -3.0]), seed=st.integers(0, 2**16))
def test_loss_and_gradients_equal_cross_entropy_over_full_logits(N, C, V, chunk, ignored, scale, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    weight = torch.randn(V, C, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = -1
    targets[0] = 0  # at least one position counts (all ignored: NaN, tested below)
    (lc, hc, wc), (lf, hf, wf) = both(hidden, weight, targets, chunk, scale)
    torch.testing.assert_close(lc, lf, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hc, hf, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(wc, wf, rtol=1e-10, atol=1e-10)


def test_float32_at_a_real_shape_within_1e_5():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(1100, 64, generator=g), torch.randn(2000, 64, generator=g) * 0.1
    targets = torch.randint(0, 2000, (1100,), generator=g)  # 1,100 rows: two full chunks and a partial one
    (lc, hc, wc), (lf, hf, wf) = both(hidden, weight, targets, 512)
    torch.testing.assert_close(lc, lf, **TOL)
    torch.testing.assert_close(hc, hf, **TOL)
    torch.testing.assert_close(wc, wf, **TOL)


def test_every_position_ignored_gives_nan_as_cross_entropy_does():
    hidden, weight = torch.randn(5, 3), torch.randn(7, 3)
    targets = torch.full((5,), -1)
    assert torch.isnan(F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-1))
    assert torch.isnan(linear_cross_entropy(hidden, weight, targets))


def test_target_outside_the_vocabulary_is_an_error_naming_the_valid_range():
    with pytest.raises(ValueError, match=r"target 7 .*valid targets are 0\.\.6"):
        linear_cross_entropy(torch.randn(3, 2), torch.randn(7, 2), torch.tensor([0, 7, -1]))
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(torch.randn(3, 2), torch.randn(7, 2), torch.tensor([0, 1]))


def test_a_retained_graph_gives_the_same_gradients_twice():
    hidden = torch.randn(20, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 9, (20,)), chunk_rows=6)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_half_precision_and_autocast_are_not_chunked():
    assert "dtypes" in chunked_loss_unsupported(torch.randn(2, 2, dtype=torch.bfloat16), torch.randn(3, 2, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert chunked_loss_unsupported(torch.randn(2, 2), torch.randn(3, 2)) == "autocast"
    assert chunked_loss_unsupported(torch.randn(2, 2), torch.randn(3, 2)) is None


# -- in the model ------------------------------------------------------------------------


def tiny(preset: str) -> tuple[PiGPT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = PiGPT(ModelConfig.from_preset(preset, size="tiny"))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size + 1), generator=g)
    # Eval mode so spectral norm takes no power-iteration step between the two forwards.
    return model.eval(), idx[:, :-1], idx[:, 1:]  # targets a strided slice, as training passes them


@pytest.mark.parametrize("preset", list(ARCH_PRESETS))
def test_every_preset_loss_and_gradient_match_the_full_logits_path(preset, monkeypatch):
    model, x, y = tiny(preset)
    results = {}
    for path in ("chunked", "full"):
        monkeypatch.setenv(LOSS_ENV, path)
        m = copy.deepcopy(model)
        out = m(x, targets=y)
        out.loss.backward()
        results[path] = (out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    (oc, gc), (of, gf) = results["chunked"], results["full"]
    assert oc._logits is None and of._logits is not None  # the chunked forward formed no logits
    torch.testing.assert_close(oc.loss, of.loss, **TOL)
    torch.testing.assert_close(oc.ce_loss, of.ce_loss, **TOL)
    assert gc.keys() == gf.keys() and len(gc) == len(list(model.parameters()))
    for name in gc:
        torch.testing.assert_close(gc[name], gf[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_logits_are_computed_on_first_read_and_carry_gradients(monkeypatch):
    model, x, y = tiny("SM+LN+G")
    out = model(x, targets=y)
    assert out._logits is None
    logits = out.logits
    assert out.logits is logits  # computed once
    monkeypatch.setenv(LOSS_ENV, "full")
    torch.testing.assert_close(logits, model(x, targets=y).logits, rtol=0, atol=0)
    logits.sum().backward()
    assert model.transformer.wte.weight.grad is not None
    with torch.no_grad():  # no gradients to form: the logits come eagerly, as before
        assert model(x, targets=y)._logits is not None


def test_an_unknown_loss_path_is_an_error_naming_the_valid_ones(monkeypatch):
    model, x, y = tiny("SM+LN+G")
    monkeypatch.setenv(LOSS_ENV, "fast")
    with pytest.raises(ValueError, match="unknown loss path 'fast'.*valid: chunked, full"):
        model(x, targets=y)
