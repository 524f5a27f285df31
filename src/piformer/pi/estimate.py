"""Secure-inference cost predicted without running SPU: `piformer pi-cost --secure`.

The secure forward pass (`jax_forward.build_program`) is a list of steps of a few kinds: the
one-hot embedding product, LayerNorm, the q/k/v projections, the temperature scaling, the
attention scores, the softmax, attention output + projection, a linear map (FFN in, out or
fused), GELU, ReLU, ScFFN's beta scaling and the vocabulary projection. Under CHEETAH each
kind's traffic is a function of its shapes alone (never of the values), but not a linear one:
it is quantised. HE products pack values into polynomials of 8,192 coefficients, so an
elementwise product of n secret values costs ceil(n / 8,192)-sized batches of ciphertexts (and
below 16,384 values none: Beaver triples instead), and a matrix product costs the ciphertexts
of the sub-block partition SPU's own search picks for its (m, k, n). OT-based protocols
(comparisons, truncations) cost per value.

So each kind's bytes, messages and seconds are modelled as a non-negative combination of a few
features (`FEATURES`) counted the way SPU 0.9.5 counts them (HE batches, ciphertexts sent and
returned, values, rows), with constants fitted to SPU's own per-step counters measured on small
one-block models (`benchmarks/fit_pi_costs.py`, which refits them and writes `spu_costs.json`).
A prediction walks the steps of the architecture's program and adds the kinds up; the one-time
setup is a fitted constant of its own.

The constants are keyed by SPU version, protocol, ring, fraction bits and settings
(`cost_key`): a prediction for settings that were never fitted is refused, not guessed.
Rounds are not fitted: SPU 0.9.5 reports messages, not rounds, so the latency's waiting term
uses the messages, an upper bound (as `pi-run` does without `--measure-rounds`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from piformer.config import ModelConfig

SPU_VERSION = "0.9.5"
COSTS_FILE = "spu_costs.json"
QUANTITIES = ("bytes", "messages", "seconds")

# ---------------------------------------------------------------------------------------
# How CHEETAH (SPU 0.9.5, FM64) spends its bytes: counted the way SPU counts them.
#
# Elementwise products of two secrets (`MulAA`) and squarings (`SquareA`) are HE "OLE"s over
# BFV polynomials of N = 8,192 slots: a tensor of n values costs ceil(n / 8,192) ciphertext
# batches (split in two halves for long vectors), whatever its shape. Below 2 x 8,192 values a
# product uses cached Beaver triples instead (bytes per value). A product with a server-owned
# plaintext (`MulAV`: ScFFN's beta, SM(t)'s temperatures, LayerNorm's gain) is one OLE batch
# per 8,192 values. Comparisons, truncations and the rest of the nonlinear protocols are
# OT-based: bytes per value. Matrix products (`DotOLE`) split the (m, k, n) product into
# sub-blocks that fit one polynomial of N = 8,192 coefficients, chosen by SPU's own cost search
# (`MatMatProtocol::GetSubMatShape`, reproduced in `dot_ciphertexts`): one party sends the
# ciphertexts of its encrypted operand, the other returns the (packed) products.

SLOTS = 8192  # CheetahMul's and CheetahDot's polynomial degree for the 64-bit ring


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def square_batches(n: int) -> int:
    """OLE batches of SPU's SquareA on n values (two halves once n > 8,192)."""
    half = n if n <= SLOTS else n // 2
    return _ceil(half, SLOTS) + _ceil(n - half, SLOTS)


def mul_batches(n: int) -> int:
    """HE batches of MulAA on n values: 0 below 2 x 8,192 (Beaver triples), else two halves."""
    if n < 2 * SLOTS:
        return 0
    return _ceil(n - n // 2, SLOTS) + _ceil(n // 2, SLOTS)


def beaver_values(n: int) -> int:
    """Values of a MulAA small enough (< 2 x 8,192) to use cached Beaver triples."""
    return n if n < 2 * SLOTS else 0


def ole_batches(n: int) -> int:
    """OLE batches of a product with a server-owned plaintext (MulAV) on n values."""
    return _ceil(n, SLOTS)


@lru_cache(maxsize=4096)
def _submat_shape(m: int, k: int, n: int, disable_pack: bool) -> tuple[int, int, int]:
    """SPU 0.9.5's `MatMatProtocol::GetSubMatShape`: the sub-block (d0, d1, d2) of an
    (m, k) x (k, n) product that minimises 1000 x ciphertexts sent and received + CPU terms."""
    N = SLOTS
    best, shape = float("inf"), (0, 0, 0)
    for d0 in range(1, min(N, m) + 1):
        b0 = _ceil(m, d0)
        d1 = 1
        while d1 <= k and d0 * d1 <= N:
            b1 = _ceil(k, d1)
            d2 = min(n, N // d0 // d1)
            b2 = _ceil(n, d2)
            sent = min(b0, b2) * b1
            response = _ceil(b0 * b2, d1)
            automorph = 0 if disable_pack else _ceil(m * n, N) * d1
            cost = (sent + response) * 1000.0 + automorph + b0 * b1 * b2 / 10.0
            if cost <= best:
                best, shape = cost, (d0, d1, d2)
            d1 = d1 + 1 if disable_pack else d1 * 2
    return shape


@lru_cache(maxsize=4096)
def dot_ciphertexts(m: int, k: int, n: int) -> tuple[int, int, int]:
    """One CHEETAH `DotOLE` of an (m, k) x (k, n) product, as `CheetahDot::Impl::doDotOLE`
    (SPU 0.9.5) decides its packing and sub-blocks: (ciphertexts sent, packed ciphertexts
    returned, values returned unpacked). A product whose result fits one ciphertext is returned
    unpacked, its unused coefficients dropped, so it costs by the values it returns."""
    d0, d1, d2 = _submat_shape(m, k, n, False)
    b0, b2 = _ceil(m, d0), _ceil(n, d2)
    if b0 * b2 <= 1:
        pack = "none"
    else:
        pack = "rlwes" if d1 < m * n else "lwes"
    if pack == "none":
        d0, d1, d2 = _submat_shape(m, k, n, True)
    b0, b1, b2 = _ceil(m, d0), _ceil(k, d1), _ceil(n, d2)
    sent = min(b0 * b1, b1 * b2)
    if pack == "rlwes":
        return sent, _ceil(b0 * b2, d1), 0
    if pack == "lwes":
        return sent, _ceil(1 << max(0, (m * n - 1).bit_length()), SLOTS), 0
    return sent, 0, m * n


# kind -> names of its shape features (the constant "one" is the per-step overhead)
FEATURES: dict[str, tuple[str, ...]] = {
    "embedding": ("ct_sent", "ct_back", "lwe_back", "T*d", "one"),
    "layernorm": ("sq_batches", "mul_batches", "ole_batches", "beaver", "rows*d", "rows", "one"),
    "qkv": ("ct_sent", "ct_back", "lwe_back", "T*d", "one"),
    "temperature": ("ole_batches", "T*d", "one"),
    "scores": ("ct_sent", "ct_back", "lwe_back", "H*T*T", "one"),
    "softmax": ("sq_batches", "mul_batches", "beaver", "H*T*T", "H*T", "clip", "one"),
    # --causal-pack: the max still runs over H*T*T, the exponential and the products over H*P
    "softmax_packed": ("sq_batches", "mul_batches", "beaver", "H*T*T", "H*P", "H*T", "clip", "one"),
    "attn_out": ("ct_sent", "ct_back", "lwe_back", "T*d", "one"),
    "linear": ("ct_sent", "ct_back", "lwe_back", "T*n", "one"),
    "gelu": ("sq_batches", "mul_batches", "beaver", "T*n", "one"),
    "relu": ("T*n", "one"),
    "beta": ("ole_batches", "T*d", "one"),
    "head": ("ct_sent", "ct_back", "lwe_back", "rows*C", "one"),
}


def step_kind(key: str) -> str | None:
    """The cost kind of a program step from its key (`jax_forward.Step.key`); None: free."""
    head = key.split(":")[0]
    if head == "softmax" and key.endswith(":packed"):
        return "softmax_packed"
    if head == "act":
        return key.split(":")[1] if key.split(":")[1] in ("gelu", "relu") else None
    return {
        "embed_first": "embedding", "embed_acc": "embedding", "ln": "layernorm", "ln_last": "layernorm",
        "qkv": "qkv", "scale": "temperature", "scores": "scores", "softmax": "softmax", "attn_out": "attn_out",
        "linear": "linear", "linear_res": "linear", "beta_res": "beta", "head": "head",
    }.get(head)


def _products(f: dict[str, float], *dots: tuple[int, int, int, int]) -> None:
    """Add the ciphertexts of `count` DotOLEs of each (count, m, k, n) to the features."""
    sent = back = values = 0
    for count, m, k, n in dots:
        s, b, v = dot_ciphertexts(m, k, n)
        sent, back, values = sent + count * s, back + count * b, values + count * v
    f.update({"ct_sent": sent, "ct_back": back, "lwe_back": values})


def _elementwise(f: dict[str, float], n: int, with_plaintext: bool = False) -> None:
    f.update({"sq_batches": square_batches(n), "mul_batches": mul_batches(n), "beaver": beaver_values(n)})
    if with_plaintext:
        f["ole_batches"] = ole_batches(n)


def step_features(step, program, cfg: ModelConfig) -> dict[str, float]:
    """The shape features of one step (names as in FEATURES[kind])."""
    from piformer.pi import jax_forward as jf

    T, d, H = program.seq_len, cfg.n_embd, cfg.n_head
    D = d // H
    kind = step_kind(step.key)
    shapes = program.server_inputs
    f: dict[str, float] = {"one": 1.0, "T*d": T * d, "H*T*T": H * T * T, "H*T": H * T}
    if kind == "embedding":  # the client's one-hot chunk times the server's embedding chunk
        C = shapes[step.inputs[-1] if step.key == "embed_acc" else step.inputs[1]][0]
        _products(f, (1, T, C, d))
    elif kind == "layernorm":  # a square, a product with 1/sqrt(var), a product with the gain
        rows = 1 if step.key.startswith("ln_last") else T
        _elementwise(f, rows * d, with_plaintext=True)
        f.update({"rows*d": rows * d, "rows": rows})
    elif kind == "qkv":  # three products with server-owned weights
        _products(f, (3, T, d, d))
    elif kind in ("temperature", "beta"):  # a product with a server-owned (T, d) multiplier
        f["ole_batches"] = ole_batches(T * d)
    elif kind == "scores":  # per head, q k^T of two secrets: both cross terms by HE
        _products(f, (2 * H, T, D, T))
    elif kind == "softmax":  # max (comparisons), exp (squarings), 1/sum, products with it
        _elementwise(f, H * T * T)
        f["clip"] = H * T * T if program.settings.get("exp_clip") is not None else 0
    elif kind == "softmax_packed":  # max over every entry; exp, 1/sum and products on the packed ones
        n = H * jf.packed_entries(T)
        _elementwise(f, n)
        f["H*P"] = n
        f["clip"] = n if program.settings.get("exp_clip") is not None else 0
    elif kind == "attn_out":  # per head P V (two secrets), then the output projection
        _products(f, (2 * H, T, T, D), (1, T, d, d))
    elif kind == "linear":
        k, n = shapes[next(n for n in step.inputs if n.endswith(".w"))]
        _products(f, (1, T, k, n))
        f["T*n"] = T * n
    elif kind in ("gelu", "relu"):
        n = T * 4 * d
        _elementwise(f, n)
        f["T*n"] = n
    elif kind == "head":
        C = shapes[step.inputs[1]][1]
        rows = 1 if program.settings.get("last_only") else T
        _products(f, (1, rows, d, C))
        f["rows*C"] = rows * C
    return {name: float(f[name]) for name in FEATURES[kind]}


def cost_key(settings) -> str:
    """Which fitted constants apply: SPU version, protocol, ring, fraction bits, settings."""
    s = settings if isinstance(settings, dict) else settings.to_dict()
    return (f"spu{SPU_VERSION}/{s['protocol']}/{s['field']}/{s['fxp_fraction_bits']}/"
            f"denom_bcast={int(bool(s['denominator_broadcast']))}/ot={s['ot_kind']}/"
            f"lsb_err={int(bool(s['mul_lsb_error']))}")


def load_costs() -> dict[str, Any]:
    """The fitted constants shipped with piformer (refit: benchmarks/fit_pi_costs.py)."""
    return json.loads(resources.files("piformer.pi").joinpath(COSTS_FILE).read_text())


@dataclass
class SecureEstimate:
    """Predicted secure-inference cost of one forward pass (setup apart)."""

    settings_key: str
    seq_len: int
    n_layer: int
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> bytes, messages, seconds
    setup: dict[str, float] = field(default_factory=dict)
    reveal_bytes: float = 0.0
    validation: dict[str, float] = field(default_factory=dict)  # the fit's error on held-out models

    def total(self, quantity: str) -> float:
        return sum(c[quantity] for c in self.per_kind.values())

    def latency(self, bandwidth_bps: float, rtt_s: float) -> dict[str, float]:
        from piformer.pi.secure import latency_model

        return latency_model(self.total("seconds"), int(self.total("bytes") + self.reveal_bytes),
                             self.total("messages"), bandwidth_bps, rtt_s)

    def to_dict(self) -> dict[str, Any]:
        from piformer.pi.secure import NETWORKS

        return {"settings_key": self.settings_key, "seq_len": self.seq_len, "n_layer": self.n_layer,
                "total_bytes": self.total("bytes"), "total_messages": self.total("messages"),
                "compute_s": self.total("seconds"), "reveal_bytes": self.reveal_bytes, "setup": self.setup,
                "per_kind": self.per_kind, "validation": self.validation,
                "latency": {name: self.latency(*net) for name, net in NETWORKS.items()},
                "rounds": "not fitted: the waiting term uses messages, an upper bound"}


def estimate(cfg: ModelConfig, seq_len: int | None = None, settings=None, vocab_chunk: int = 4096,
             last_only: bool = False, costs: dict[str, Any] | None = None) -> SecureEstimate:
    """Predict bytes, messages and compute seconds of `cfg`'s secure forward pass at `seq_len`."""
    from piformer.pi import jax_forward as jf
    from piformer.pi.spu_backend import SPUSettings

    settings = settings or SPUSettings()
    key = cost_key(settings)
    table = (costs or load_costs())["fits"]
    if key not in table:
        raise ValueError(f"no fitted SPU costs for {key}; fitted: {', '.join(sorted(table))} "
                         "(refit with benchmarks/fit_pi_costs.py)")
    fit = table[key]
    program = jf.build_program(cfg, seq_len, vocab_chunk=vocab_chunk, last_only=last_only,
                               **settings.program_options())
    est = SecureEstimate(key, program.seq_len, cfg.n_layer, setup=dict(fit["setup"]),
                         validation=dict(fit.get("validation", {})))
    for step in program.steps:
        kind = step_kind(step.key)
        if kind is None:
            continue
        if kind not in fit["kinds"]:
            raise ValueError(f"no fitted SPU cost for step kind {kind!r} under {key} "
                             "(refit with benchmarks/fit_pi_costs.py)")
        feats = step_features(step, program, cfg)
        acc = est.per_kind.setdefault(kind, {q: 0.0 for q in QUANTITIES})
        for q in QUANTITIES:
            coef = fit["kinds"][kind][q]
            acc[q] += sum(coef[name] * value for name, value in feats.items())
    rows = 1 if last_only else program.seq_len
    est.reveal_bytes = fit["reveal_bytes_per_logit"] * rows * cfg.vocab_size
    return est


def format_estimate(est: SecureEstimate) -> str:
    from piformer.pi.secure import NETWORKS

    v = est.validation
    accuracy = (f"on {v['held_out_runs']} held-out models ({v.get('set', 'dev')} set) its total bytes were off "
                f"by up to {v['max_abs_bytes_error']:.1%}" if v else "not validated")
    lines = [f"predicted secure inference ({est.settings_key}), T={est.seq_len}, {est.n_layer} blocks; "
             "fitted to SPU's counters, no SPU run",
             f"accuracy: {accuracy} (docs/private_inference.md, 'Predicting the cost')",
             "", f"{'kind':<12} {'MB (both ways)':>15} {'messages':>10} {'compute s':>10}"]
    for kind, c in sorted(est.per_kind.items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"{kind:<12} {c['bytes'] / 1e6:>15.1f} {c['messages']:>10.0f} {c['seconds']:>10.1f}")
    lines.append(f"{'total':<12} {est.total('bytes') / 1e6:>15.1f} {est.total('messages'):>10.0f} "
                 f"{est.total('seconds'):>10.1f}")
    lines.append(f"(plus one-time setup {est.setup['bytes'] / 1e6:.1f} MB, {est.setup['messages']:.0f} messages; "
                 f"output reveal {est.reveal_bytes / 1e6:.2f} MB)")
    lines.append("compute: both parties on the fitting machine (2 cores); waits: messages stand in (an upper bound)")
    for name, (bw, rtt) in NETWORKS.items():
        lat = est.latency(bw, rtt)
        lines.append(f"  {name} ({bw / 1e6:g} Mbit/s, {rtt * 1e3:g} ms): {lat['compute_s']:.1f} + "
                     f"{lat['transfer_s']:.1f} + {lat['waiting_s']:.1f} = {lat['total_s']:.1f} s")
    return "\n".join(lines)
