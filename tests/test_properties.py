"""Properties that hold for every input, checked on inputs Hypothesis generates (and shrinks).

Row entropy, the entropy regulariser's penalty, head bands, config round trips and the
analytic FLOP counts. Examples are few, so the file runs in seconds, and failing ones are not
saved to an example database: a failure prints the example that reproduces it.
"""

import json
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from piformer.config import (
    FFN_ACTS, FFN_KINDS, NORM_GROUPS, NORMS, REG_MODES, REG_REDUCTIONS, TEMPERATURE_PARAMS,
    ModelConfig, TrainConfig, parse_overrides,
)
from piformer.entropy import (
    entropy_penalty, head_bands, head_entropy, outside_tolerance, row_entropy, row_entropy_from_logits,
    softmax_with_entropy, uniform_causal_entropy,
)
from piformer.pi.cost import pi_cost

FEW = settings(max_examples=40, deadline=None, database=None)
MASKED = torch.finfo(torch.float32).min  # the fill the model's causal mask uses


def _causal(logits: torch.Tensor) -> torch.Tensor:
    T = logits.shape[-1]
    return logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), MASKED)


@st.composite
def causal_logits(draw, max_t=10, bound=50.0):
    """(T, T) float32 logits, causally masked: row i sees keys 0..i."""
    T = draw(st.integers(1, max_t))
    vals = draw(st.lists(st.floats(-bound, bound, width=32), min_size=T * T, max_size=T * T))
    return _causal(torch.tensor(vals, dtype=torch.float32).view(T, T))


def _log_visible(T: int) -> torch.Tensor:
    """log(i + 1) for rows i = 0..T-1: the most entropy causal row i can have."""
    return torch.log(torch.arange(1, T + 1, dtype=torch.float32))


# ---------------------------------------------------------------------------------------
# Row entropy


@FEW
@given(causal_logits(bound=1e4))
def test_causal_row_entropy_lies_between_0_and_log_of_the_visible_keys(logits):
    p, h = softmax_with_entropy(logits)
    assert torch.equal(h, row_entropy_from_logits(logits))
    cap = _log_visible(logits.shape[0])
    assert (h >= 0).all(), h
    assert (h <= cap + 1e-5 * (1 + cap)).all(), (h, cap)
    assert (p.triu(1) == 0).all()  # masked keys get exactly no probability
    torch.testing.assert_close(p.sum(-1), torch.ones(logits.shape[0]))


@FEW
@given(st.integers(1, 64), st.floats(-1e3, 1e3, width=32))
def test_a_uniform_causal_row_has_entropy_log_of_its_visible_keys(T, value):
    h = row_entropy_from_logits(_causal(torch.full((T, T), value)))
    torch.testing.assert_close(h, _log_visible(T), rtol=1e-5, atol=1e-6)


@FEW
@given(causal_logits(bound=20.0), st.data())
def test_adding_a_constant_to_a_rows_logits_leaves_its_entropy_unchanged(logits, data):
    T = logits.shape[0]
    shift = torch.tensor(data.draw(st.lists(st.floats(-100, 100, width=32), min_size=T, max_size=T)))
    shifted = _causal(logits + shift[:, None])  # the visible keys move together; the mask stays
    torch.testing.assert_close(row_entropy_from_logits(shifted), row_entropy_from_logits(logits),
                               rtol=0, atol=1e-4)


@FEW
@given(causal_logits(max_t=8, bound=30.0), st.integers(1, 3))
def test_head_entropy_is_the_mean_row_entropy_and_at_most_the_uniform_heads(logits, heads):
    """Eq. 7: a head's entropy is the mean over its query rows; no causal head exceeds the one
    that attends uniformly (mean of log(i + 1)), which stays below log T."""
    T = logits.shape[0]
    probs = torch.stack([torch.softmax(logits * (h + 1), -1) for h in range(heads)])[None]  # (1, H, T, T)
    e = head_entropy(probs)
    torch.testing.assert_close(e, row_entropy(probs).mean(dim=(0, 2)))
    assert (e <= uniform_causal_entropy(T) + 1e-5).all() and uniform_causal_entropy(T) <= math.log(T) + 1e-12


# ---------------------------------------------------------------------------------------
# The regulariser's penalty: (E - theta log T)^2 outside the band |E - theta log T| <= gamma log T


@st.composite
def penalty_case(draw, inside=(0.0, 0.99), outside=(1.01, 20.0), query=None):
    """(entropy, thresholds, T, gamma, u): entropy = theta log T + u gamma log T per entry.

    u is drawn from `inside` or `outside` (in units of the band's half-width, either sign),
    away from the edge by a margin that float32 rounding cannot cross.
    """
    L, H = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    N = draw(st.integers(1, 5)) if (draw(st.booleans()) if query is None else query) else None
    T, gamma = draw(st.integers(2, 1024)), draw(st.floats(0.01, 0.5))
    shape = (L, H) if N is None else (L, H, N)
    n = math.prod(shape)
    ranges = [r for r in (inside, outside) if r is not None]
    mags = [draw(st.sampled_from(ranges).flatmap(lambda r: st.floats(*r))) for _ in range(n)]
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
    u = torch.tensor([m * s for m, s in zip(mags, signs)], dtype=torch.float64).view(shape)
    theta = torch.tensor(draw(st.lists(st.floats(0, 1), min_size=L * H, max_size=L * H))).view(L, H)
    log_t = math.log(T)
    target = theta * log_t if N is None else (theta * log_t)[..., None]
    entropy = (target + u * gamma * log_t).float()
    return entropy, theta.float(), T, gamma, u


def _expected_penalty(entropy, thresholds, T, gamma, u, reduction="sum"):
    """Algorithm 1 gated by where each entry was drawn (inside or outside the band), squared and
    reduced in float64 from the float32 deviation."""
    target = thresholds * math.log(T)
    dev = (entropy - (target if entropy.dim() == 2 else target[..., None])).double()
    gated = torch.where(u.abs() > 1, dev.square(), torch.zeros_like(dev))
    if gated.dim() == 3:
        gated = gated.sum(-1) if reduction == "sum" else gated.mean(-1)
    return gated.mean(1).mean(0).item()


@FEW
@given(penalty_case(outside=None), st.sampled_from(REG_REDUCTIONS))
def test_penalty_is_zero_when_every_entropy_is_inside_its_band(case, reduction):
    entropy, theta, T, gamma, _ = case
    assert entropy_penalty(entropy, theta, T, gamma, reduction).item() == 0.0


@FEW
@given(penalty_case(), st.sampled_from(REG_REDUCTIONS))
def test_penalty_is_the_squared_deviation_outside_the_band_and_nothing_inside(case, reduction):
    entropy, theta, T, gamma, u = case
    got = entropy_penalty(entropy, theta, T, gamma, reduction).item()
    assert math.isclose(got, _expected_penalty(entropy, theta, T, gamma, u, reduction), rel_tol=1e-4, abs_tol=1e-12)


@FEW
@given(st.integers(2, 1024), st.floats(0.01, 0.5), st.floats(0, 1), st.sampled_from([-1.0, 1.0]),
       st.floats(1.01, 20.0), st.floats(1.01, 20.0))
def test_penalty_jumps_at_the_band_edge_and_grows_with_the_deviation_beyond_it(T, gamma, theta, sign, a, b):
    """The gate is a step, not a hinge: just inside the band the penalty is 0, just outside it is
    already (gamma log T)^2 (Algorithm 1 squares the whole deviation, not the excess). Beyond
    the edge it never decreases as |E - theta log T| grows."""
    log_t = math.log(T)
    th = torch.tensor([[theta]], dtype=torch.float32)

    def pen(u):  # float32 sums and roundings are monotone: so is E, exactly, in u
        e = th * log_t + torch.tensor([[sign * u * gamma * log_t]], dtype=torch.float32)
        return entropy_penalty(e, th, T, gamma).item()

    edge = (gamma * log_t) ** 2
    assert pen(0.999) == 0.0
    assert math.isclose(pen(1.001), edge, rel_tol=5e-3)
    lo, hi = sorted((a, b))
    assert edge * 0.99 <= pen(lo) <= pen(hi)


@FEW
@given(st.integers(2, 4096), st.floats(0.01, 0.9), st.sampled_from([-1.0, 1.0]))
def test_penalty_at_the_band_edge_is_zero_and_jumps_just_past_it(T, gamma, sign):
    """Exactly at |E - theta log T| = gamma log T the penalty is still 0 (Appendix B compares with
    '>'), so it is continuous from inside the band; one float64 ulp past the edge it is the full
    (gamma log T)^2: the jump is the formula's (it squares the whole deviation, not the excess)."""
    margin = gamma * math.log(T)
    theta = torch.zeros(1, 1, dtype=torch.float64)  # target 0: the deviation is E itself, exactly
    edge = torch.tensor([[sign * margin]], dtype=torch.float64)
    past = torch.tensor([[sign * math.nextafter(margin, math.inf)]], dtype=torch.float64)
    assert entropy_penalty(edge, theta, T, gamma).item() == 0.0
    assert math.isclose(entropy_penalty(past, theta, T, gamma).item(), margin**2, rel_tol=1e-12)


@FEW
@given(penalty_case())
def test_outside_share_is_the_fraction_of_entries_outside_the_band(case):
    entropy, theta, T, gamma, u = case
    share = outside_tolerance(entropy, theta, T, gamma).item()
    assert math.isclose(share, (u.abs() > 1).double().mean().item(), rel_tol=0, abs_tol=1e-6)
    assert (share == 0.0) == (entropy_penalty(entropy, theta, T, gamma).item() == 0.0)


@FEW
@given(penalty_case(inside=(0.0, 20.0), outside=None, query=True))
def test_penalty_sum_over_query_rows_is_n_times_the_mean(case):
    entropy, theta, T, gamma, _ = case
    N = entropy.shape[-1]
    total = entropy_penalty(entropy, theta, T, gamma, "sum").item()
    mean = entropy_penalty(entropy, theta, T, gamma, "mean").item()
    assert math.isclose(total, N * mean, rel_tol=1e-5, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------
# Head bands


@FEW
@given(st.lists(st.floats(0, 20, width=32), min_size=1, max_size=48),
       st.one_of(st.none(), st.floats(0, 20, width=32)))
def test_head_bands_are_fractions_that_sum_to_one(entropies, reference):
    e = torch.tensor(entropies)
    bands = head_bands(e, reference)
    assert len(bands) == 4 and all(0.0 <= b <= 1.0 for b in bands)
    assert math.isclose(sum(bands), 1.0, rel_tol=0, abs_tol=1e-6)
    if reference is None and e.max() > 0:
        assert bands[3] >= 1 / len(entropies) - 1e-7  # the largest head is in the top band


# ---------------------------------------------------------------------------------------
# Configs: to_dict / JSON / from_dict, and --set strings, give back the same config


_GROUPS = st.lists(st.sampled_from(NORM_GROUPS), max_size=3, unique=True).map("+".join)


@st.composite
def model_configs(draw):
    n_head = draw(st.integers(1, 16))
    ffn = draw(st.sampled_from(FFN_KINDS))
    return ModelConfig(
        n_layer=draw(st.integers(1, 48)), n_head=n_head, n_embd=n_head * draw(st.integers(1, 128)),
        block_size=draw(st.integers(1, 4096)), vocab_size=draw(st.integers(1, 1 << 17)),
        bias=draw(st.booleans()), dropout=draw(st.floats(0, 1)), norm=draw(st.sampled_from(NORMS)),
        ffn_act="none" if ffn == "fused" else draw(st.sampled_from(FFN_ACTS)), ffn=ffn,
        ffn_scale=draw(st.booleans()), weight_norm=draw(_GROUPS), spectral_norm=draw(_GROUPS),
        attn_temperature=draw(st.booleans()), temperature_init=draw(st.floats(1e-6, 10)),
        temperature_param=draw(st.sampled_from(TEMPERATURE_PARAMS)), entropy_reg=draw(st.booleans()),
        reg_threshold_init=draw(st.floats(0, 1)), init_std=draw(st.floats(1e-5, 1)),
    )


@st.composite
def train_configs(draw):
    mode = draw(st.sampled_from(REG_MODES))
    pos = st.floats(1e-9, 10)
    lr = draw(pos)
    return TrainConfig(
        max_steps=draw(st.integers(1, 10**6)), batch_size=draw(st.integers(1, 4096)),
        micro_batch_size=draw(st.integers(1, 512)), lr=lr, min_lr=draw(st.floats(0, lr)),
        schedule=draw(st.sampled_from(["linear", "cosine"])), warmup=draw(st.floats(0, 5000)),
        weight_decay=draw(st.floats(0, 1)), beta1=draw(st.floats(0, 0.999)), beta2=draw(st.floats(0, 0.9999)),
        eps=draw(pos), grad_clip=draw(st.floats(0, 10)), seed=draw(st.integers(0, 2**32 - 1)),
        eval_interval=draw(st.integers(1, 10**5)), eval_batches=draw(st.integers(1, 1000)),
        log_interval=draw(st.integers(1, 10**4)), checkpoint_interval=draw(st.integers(1, 10**5)),
        dtype=draw(st.sampled_from(["auto", "bf16", "fp16", "fp32"])), compile=draw(st.booleans()),
        device=draw(st.sampled_from(["auto", "cpu", "cuda"])), tensorboard=draw(st.booleans()),
        reg_lambda=draw(st.floats(0, 1)), reg_gamma=draw(st.floats(0, 1)), reg_mode=mode,
        reg_reduction="mean" if mode == "head" else draw(st.sampled_from(REG_REDUCTIONS)),
        reg_grad_interval=draw(st.integers(0, 1000)),
    )


@FEW
@given(model_configs(), train_configs())
def test_configs_survive_a_trip_through_json(model, train):
    back = ModelConfig.from_dict(json.loads(json.dumps(model.to_dict())))
    assert back == model and ModelConfig.from_saved(model.to_dict()) == model
    assert ModelConfig.from_json(model.to_json()) == model
    assert TrainConfig.from_dict(json.loads(json.dumps(train.to_dict()))) == train


_TRUE = ("true", "True", "1", "yes", "on")
_FALSE = ("false", "False", "0", "no", "off")


def _as_cli(value, data) -> str:
    """How a user might type `value` after --set key=."""
    if isinstance(value, bool):
        return data.draw(st.sampled_from(_TRUE if value else _FALSE))
    return repr(value) if isinstance(value, float) else str(value)


@FEW
@given(model_configs(), train_configs(), st.data())
def test_set_overrides_parse_back_to_the_values_they_were_made_from(model, train, data):
    model_keys, train_keys = set(model.to_dict()), set(train.to_dict())
    items = []
    for section, cfg, other in (("model", model, train_keys), ("train", train, model_keys)):
        for k, v in cfg.to_dict().items():
            bare = k not in other and data.draw(st.booleans())  # 'lr=...' as well as 'train.lr=...'
            items.append(f"{'' if bare else section + '.'}{k}={_as_cli(v, data)}")
    parsed = parse_overrides(data.draw(st.permutations(items)))
    assert ModelConfig.from_dict(parsed["model"]) == model
    assert TrainConfig.from_dict(parsed["train"]) == train


# ---------------------------------------------------------------------------------------
# FLOPs (SPEC section 5): FFN = 2*2*T*d*4d*L (fused 2*T*d*d*L), Attn = 8*T*d^2*L + 3*T^2*d*L


@st.composite
def cost_shapes(draw):
    return dict(L=draw(st.integers(1, 48)), H=draw(st.integers(1, 16)), hd=draw(st.integers(1, 128)),
                T=draw(st.integers(1, 2048)), V=draw(st.integers(1, 1 << 17)), fused=draw(st.booleans()))


def _cost(L, H, hd, T, V, fused, seq_len=None):
    cfg = ModelConfig(n_layer=L, n_head=H, n_embd=H * hd, block_size=2 * T, vocab_size=V,
                      ffn="fused" if fused else "standard", ffn_act="none" if fused else "gelu")
    return pi_cost(cfg, seq_len=seq_len or T)


@FEW
@given(cost_shapes())
def test_flops_follow_the_papers_formulas(s):
    c = _cost(**s)
    L, T, d = s["L"], s["T"], s["H"] * s["hd"]
    assert c.ffn_flops == (2 * T * d * d if s["fused"] else 2 * 2 * T * d * 4 * d) * L
    assert c.attn_flops == 8 * T * d * d * L + 3 * T * T * d * L
    # Paper FLOPs are 2 per multiply-accumulate, except its own 3 T^2 d for the two T x T products.
    assert c.ffn_flops == 2 * c.macs["ffn"]
    assert c.attn_flops == 2 * c.macs["qkvo_projections"] + 3 * T * T * d * L
    assert c.macs["blocks_total"] == sum(v for k, v in c.macs.items() if k != "blocks_total")


@FEW
@given(cost_shapes(), st.integers(2, 4))
def test_flops_scale_as_the_formulas_say(s, k):
    base = _cost(**s)
    L, T, d = s["L"], s["T"], s["H"] * s["hd"]
    deeper = _cost(**{**s, "L": k * L})  # linear in depth, every count
    assert (deeper.ffn_flops, deeper.attn_flops) == (k * base.ffn_flops, k * base.attn_flops)
    assert deeper.macs == {name: k * v for name, v in base.macs.items()}
    longer = _cost(**s, seq_len=2 * T)  # FFN linear in T; attention has a T^2 term
    assert longer.ffn_flops == 2 * base.ffn_flops
    assert longer.attn_flops - 2 * base.attn_flops == 6 * T * T * d * L
    wider = _cost(**{**s, "hd": 2 * s["hd"]})  # FFN quadratic in d; attention d^2 and d terms
    assert wider.ffn_flops == 4 * base.ffn_flops
    assert wider.attn_flops - 2 * base.attn_flops == 16 * T * d * d * L
    # Heads and vocabulary do not enter; fusing the FFN divides it by 8.
    same_width = _cost(**{**s, "H": 1, "hd": d, "V": 1})
    assert (same_width.ffn_flops, same_width.attn_flops) == (base.ffn_flops, base.attn_flops)
    other = _cost(**{**s, "fused": not s["fused"]})
    fused, standard = (base, other) if s["fused"] else (other, base)
    assert 8 * fused.ffn_flops == standard.ffn_flops and fused.attn_flops == standard.attn_flops



@FEW
@given(cost_shapes(), st.sampled_from(["SM+LN+G", "SM+LN+R", "SM+LN", "SM+G", "SM", "SM+ScFuFFN"]))
def test_nonlinear_op_counts_follow_the_architecture(s, preset):
    """Per block: H softmaxes of T x T; 2 LayerNorms of T x d when the block has them; one
    activation of T x 4d when the FFN has one. The final LayerNorm is listed apart, never counted."""
    L, H, T, d = s["L"], s["H"], s["T"], s["H"] * s["hd"]
    cfg = ModelConfig.from_preset(preset, size="tiny", n_layer=L, n_head=H, n_embd=d, block_size=T, vocab_size=s["V"])
    ops = {op.kind: op for op in pi_cost(cfg).nonlinear}
    assert (ops["softmax"].count, ops["softmax"].shape) == (L * H, (T, T))
    assert ("layernorm" in ops) == (cfg.norm == "layernorm")
    if "layernorm" in ops:
        assert (ops["layernorm"].count, ops["layernorm"].shape) == (2 * L, (T, d))
    acts = [k for k in ops if k in ("gelu", "relu")]
    assert acts == ([] if cfg.ffn_act == "none" else [cfg.ffn_act])
    for k in acts:
        assert (ops[k].count, ops[k].shape) == (L, (T, 4 * d))
    assert all(op.elements == op.count * op.shape[0] * op.shape[1] for op in ops.values())
    c = pi_cost(cfg)
    assert (c.final_layernorm.count, c.final_layernorm.shape) == (1, (T, d))
