"""Secure-inference cost predicted without running SPU: `piformer pi-cost --secure`.

The secure forward pass (`jax_forward.build_program`) is a list of steps of a few kinds: the
one-hot embedding product, LayerNorm, the q/k/v projections, the temperature scaling, the
attention scores, the softmax, attention output + projection, a linear map (FFN in, out or
fused), GELU, ReLU, ScFFN's beta scaling and the vocabulary projection. Under CHEETAH each
kind's traffic is a function of its shapes alone (never of the values): elementwise protocols
(exponential, reciprocal, comparisons, truncation) move bytes in proportion to the elements and
rows they touch, HE matrix products in proportion to the matrices they encrypt and return.

So each kind's bytes, messages and seconds are modelled as a non-negative combination of a few
shape features (`FEATURES`), with constants fitted to SPU's own per-step counters measured on
small models (`benchmarks/fit_pi_costs.py`, which refits them and writes `spu_costs.json`). A
prediction walks the steps of the architecture's program and adds the kinds up; the one-time
setup is a fitted constant of its own.

The constants are keyed by SPU version, protocol, ring, fraction bits and settings
(`cost_key`): a prediction for settings that were never fitted is refused, not guessed.
Rounds are not fitted: SPU 0.9.5 reports messages, not rounds, so the latency's waiting term
uses the messages, an upper bound (as `pi-run` does without `--measure-rounds`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from piformer.config import ModelConfig

SPU_VERSION = "0.9.5"
COSTS_FILE = "spu_costs.json"
QUANTITIES = ("bytes", "messages", "seconds")

# kind -> names of its shape features (the constant "one" is the per-step overhead)
FEATURES: dict[str, tuple[str, ...]] = {
    "embedding": ("T*C", "C*d", "T*d", "one"),
    "layernorm": ("rows*d", "rows", "one"),
    "qkv": ("T*d", "d*d", "one"),
    "temperature": ("T*d", "one"),
    "scores": ("T*d", "H*T*T", "one"),
    "softmax": ("H*T*T", "H*T", "one"),
    "attn_out": ("H*T*T", "T*d", "d*d", "one"),
    "linear": ("T*k", "T*n", "k*n", "one"),
    "gelu": ("T*n", "one"),
    "relu": ("T*n", "one"),
    "beta": ("T*d", "one"),
    "head": ("rows*d", "rows*C", "d*C", "one"),
}


def step_kind(key: str) -> str | None:
    """The cost kind of a program step from its key (`jax_forward.Step.key`); None: free."""
    head = key.split(":")[0]
    if head == "act":
        return key.split(":")[1] if key.split(":")[1] in ("gelu", "relu") else None
    return {
        "embed_first": "embedding", "embed_acc": "embedding", "ln": "layernorm", "ln_last": "layernorm",
        "qkv": "qkv", "scale": "temperature", "scores": "scores", "softmax": "softmax", "attn_out": "attn_out",
        "linear": "linear", "linear_res": "linear", "beta_res": "beta", "head": "head",
    }.get(head)


def step_features(step, program, cfg: ModelConfig) -> dict[str, float]:
    """The shape features of one step (names as in FEATURES[kind])."""
    T, d, H = program.seq_len, cfg.n_embd, cfg.n_head
    kind = step_kind(step.key)
    shapes = program.server_inputs
    f: dict[str, float] = {"one": 1.0, "T*d": T * d, "d*d": d * d, "H*T*T": H * T * T, "H*T": H * T}
    if kind == "embedding":
        C = shapes[step.inputs[-1] if step.key == "embed_acc" else step.inputs[1]][0]
        f.update({"T*C": T * C, "C*d": C * d})
    elif kind == "layernorm":
        rows = 1 if step.key.startswith("ln_last") else T
        f.update({"rows*d": rows * d, "rows": rows})
    elif kind == "linear":
        k, n = shapes[next(n for n in step.inputs if n.endswith(".w"))]
        f.update({"T*k": T * k, "T*n": T * n, "k*n": k * n})
    elif kind in ("gelu", "relu"):
        f["T*n"] = T * 4 * d
    elif kind == "head":
        C = shapes[step.inputs[1]][1]
        rows = 1 if program.settings.get("last_only") else T
        f.update({"rows*d": rows * d, "rows*C": rows * C, "d*C": d * C})
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
    program = jf.build_program(cfg, seq_len, vocab_chunk=vocab_chunk, exp_clip=settings.exp_clip,
                               last_only=last_only)
    est = SecureEstimate(key, program.seq_len, cfg.n_layer, setup=dict(fit["setup"]),
                         validation=dict(fit.get("validation", {})))
    for step in program.steps:
        kind = step_kind(step.key)
        if kind is None:
            continue
        if kind not in fit["kinds"]:
            raise ValueError(f"no fitted SPU cost for step kind {kind!r} under {key}")
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
    accuracy = (f"on {v['held_out_runs']} held-out models its total bytes were off by up to "
                f"{v['max_abs_bytes_error']:.0%}" if v else "not validated")
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
