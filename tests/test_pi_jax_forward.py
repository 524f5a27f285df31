"""The JAX forward (the program SPU runs) equals the PyTorch model for every preset."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jax")

from piformer.config import ARCH_PRESETS, ModelConfig  # noqa: E402
from piformer.model import PiGPT  # noqa: E402
from piformer.pi.jax_forward import build_program, forward, state_dict_to_numpy  # noqa: E402

# float32 on both sides; observed max |diff| <= 1e-6 on logits of magnitude ~2-3 (all presets).
ATOL, RTOL = 1e-4, 1e-4


def _perturbed_model(preset: str, seed: int = 0, **overrides) -> PiGPT:
    """A tiny model whose every parameter matters: weights scaled up so attention is peaked,
    temperatures, alpha/beta, LayerNorm gains and weight-norm magnitudes moved off their init."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(preset, size="tiny", **overrides)
    m = PiGPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "temperature" in name:
                p.copy_(0.2 + torch.rand_like(p))  # distinct per head and query position
            elif "ffn_alpha" in name:
                p.fill_(1.7)
            elif "ffn_beta" in name:
                p.fill_(0.6)
            elif p.dim() >= 2:
                p.mul_(6.0)  # std 0.12: logits of order 1-10, attention far from uniform
            else:
                p.add_(0.2 * torch.randn_like(p))  # biases, LN gains, WN magnitudes
    return m


@pytest.mark.parametrize("preset", list(ARCH_PRESETS))
def test_jax_matches_torch(preset):
    m = _perturbed_model(preset)
    cfg = m.config
    ids = torch.randint(0, cfg.vocab_size, (1, cfg.block_size))
    with torch.no_grad():
        ref = m(ids).logits[0].numpy()
    # a vocabulary chunk that does not divide V exercises the chunked embedding and head
    out = forward(state_dict_to_numpy(m), cfg, ids.numpy()[0], vocab_chunk=40)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=ATOL * max(1.0, np.abs(ref).max()), rtol=RTOL)


@pytest.mark.parametrize("preset", ["SM+LN+G", "EReg(SM(t)+ScFuFFN)"])
def test_no_bias_and_short_sequence(preset):
    m = _perturbed_model(preset, seed=1, bias=False)
    ids = torch.randint(0, m.config.vocab_size, (1, 5))
    with torch.no_grad():
        ref = m(ids).logits[0].numpy()
    out = forward(state_dict_to_numpy(m), m.config, ids.numpy()[0])
    np.testing.assert_allclose(out, ref, atol=ATOL * max(1.0, np.abs(ref).max()), rtol=RTOL)


def test_exp_clip_is_harmless_in_plaintext():
    m = _perturbed_model("SM+ScFuFFN")
    ids = np.arange(m.config.block_size) % m.config.vocab_size
    sd = state_dict_to_numpy(m)
    a = forward(sd, m.config, ids)
    b = forward(sd, m.config, ids, exp_clip=16.0)
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM(t)+ScFuFFN"])
@pytest.mark.parametrize("T", [1, 7, 32, 45])
def test_the_packed_causal_softmax_is_the_same_model(preset, T):
    """--causal-pack changes which entries are computed, never the function: logits equal the
    full layout's (and so PyTorch's) at lengths below, at and above the group count."""
    m = _perturbed_model(preset, block_size=64)
    ids = np.arange(T) * 7 % m.config.vocab_size
    sd = state_dict_to_numpy(m)
    full = forward(sd, m.config, ids)
    packed = forward(sd, m.config, ids, causal_pack=True)
    np.testing.assert_allclose(packed, full, atol=ATOL * max(1.0, np.abs(full).max()), rtol=RTOL)
    program = build_program(m.config, T, causal_pack=True)
    assert all(s.key.endswith(":packed") for s in program.steps if s.op_class == "softmax")


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM+ScFuFFN"])
def test_the_wide_layernorm_is_the_same_model(preset):
    m = _perturbed_model(preset)
    ids = np.arange(m.config.block_size) % m.config.vocab_size
    sd = state_dict_to_numpy(m)
    np.testing.assert_allclose(forward(sd, m.config, ids, ln_wide=True), forward(sd, m.config, ids), atol=1e-4)


def test_the_wide_layernorm_takes_its_scaled_branch_exactly_for_large_rows():
    """Rows of variance from 2^16 on take the 2^-8-scaled variance (its eps scaled alike); in
    float32 both branches are LayerNorm, so rows on either side of 2^16 match the plain one."""
    from piformer.pi.jax_forward import _layernorm

    rng = np.random.default_rng(0)
    scales = np.array([1e-2, 1.0, 255.0, 257.0, 1e4, 8e4], np.float32)[:, None]  # std across 2^8
    x = rng.normal(size=(len(scales), 64)).astype(np.float32) * scales
    w = np.ones(64, np.float32)
    np.testing.assert_allclose(np.asarray(_layernorm(x, w, wide=True)), np.asarray(_layernorm(x, w)), atol=1e-4)


@pytest.mark.parametrize("T", [1, 2, 31, 32, 33, 100, 128, 1000])
def test_pack_groups_cover_every_visible_entry_once(T):
    from piformer.pi.jax_forward import PACK_GROUPS, pack_groups, packed_entries

    groups = pack_groups(T)
    rows = [r for a, b in groups for r in range(a, b)]
    assert rows == list(range(T))  # every row once, in order
    sizes = [b - a for a, b in groups]
    assert max(sizes) - min(sizes) <= 1 and len(groups) == min(T, PACK_GROUPS)
    assert T * (T + 1) // 2 <= packed_entries(T) <= T * T
    if T >= PACK_GROUPS:  # the packing's point: about half of T x T
        assert packed_entries(T) <= 0.53 * T * T + T


def test_program_classes_and_owners():
    cfg = ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", size="tiny")
    prog = build_program(cfg, 8, vocab_chunk=40)
    classes = {s.op_class for s in prog.steps}
    assert classes == {"embedding", "matmul", "softmax", "other", "layernorm", "head"}
    assert set(prog.client_inputs) == {"onehot.0", "onehot.1", "onehot.2"}  # 97 = 40 + 40 + 17
    assert all(not n.startswith("onehot") for n in prog.server_inputs)
    with pytest.raises(ValueError, match="seq_len"):
        build_program(cfg, cfg.block_size + 1)


def test_last_only_is_the_last_row():
    m = _perturbed_model("SM+LN+G")
    ids = np.arange(m.config.block_size) % m.config.vocab_size
    sd = state_dict_to_numpy(m)
    full = forward(sd, m.config, ids, vocab_chunk=40)
    last = forward(sd, m.config, ids, vocab_chunk=40, last_only=True)
    assert last.shape == (1, m.config.vocab_size)
    np.testing.assert_allclose(last[0], full[-1], atol=1e-5)
