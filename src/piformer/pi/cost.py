"""Analytic private-inference cost: nonlinear-op counts, FLOPs and exact MACs.

Two conventions live here side by side:

* the paper's (SPEC section 5), which reproduces Tables 2, 3, 6 and 7:
  FFN = 2 * 2 * T * d * 4d * L (fused: 2 * T * d * d * L),
  Attn = 8 * T * d^2 * L + 3 * T^2 * d * L;
* an exact multiply-accumulate count of every matrix product the forward pass runs
  (Q, K, V, O projections, Q.K^T and A.V over the full T x T square, the FFN), with the
  embedding lookup and the vocabulary projection listed apart, as the paper lists them apart.

The paper's attention term ``3 T^2 d`` is its own convention: Q.K^T and A.V are ``2 T^2 d``
MACs, i.e. ``4 T^2 d`` FLOPs at 2 FLOPs per MAC. We keep it to reproduce the tables and
report the exact count beside it.

The paper's printed FLOPs look rounded twice (to 2 decimals, then to 1): Table 3's fused FFN
at T=512 is exactly 7.248B but printed 7.3B; every other entry agrees with that reading too.
`paper_billions` reproduces the printed strings; the exact integers are always reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from piformer.config import ModelConfig
from piformer.paper import PAPER_TABLES  # the paper's PI tables (SPEC section 5), beside our estimates


@dataclass(frozen=True)
class NonlinearOp:
    """`count` instances of a nonlinear operator, each applied to a `shape` tensor."""

    kind: str  # "softmax" | "layernorm" | "gelu" | "relu"
    count: int
    shape: tuple[int, int]

    @property
    def elements(self) -> int:
        return self.count * self.shape[0] * self.shape[1]

    def paper_str(self) -> str:
        """Paper notation, e.g. 'SM:144xR^{128x128}'."""
        tag = {"softmax": "SM", "layernorm": "LN", "gelu": "G", "relu": "R"}[self.kind]
        return f"{tag}:{self.count}xR^{{{self.shape[0]}x{self.shape[1]}}}"


@dataclass
class PICost:
    """Everything the analytic model says about one architecture at one sequence length."""

    preset: str | None
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int
    vocab_size: int
    nonlinear: list[NonlinearOp]
    final_layernorm: NonlinearOp  # listed apart: the paper does not count it
    ffn_flops: int  # paper convention
    attn_flops: int  # paper convention
    macs: dict[str, int] = field(default_factory=dict)  # exact, per block part and in total
    embedding_macs: int = 0  # one-hot embedding as a matmul (a plain lookup costs no MAC)
    head_macs: int = 0  # vocabulary projection
    elementwise: dict[str, int] = field(default_factory=dict)  # scalings that are not matmuls

    @property
    def ffn_flops_str(self) -> str:
        return paper_billions(self.ffn_flops)

    @property
    def attn_flops_str(self) -> str:
        return paper_billions(self.attn_flops)

    def nonlinear_str(self) -> str:
        return ", ".join(op.paper_str() for op in self.nonlinear)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nonlinear"] = [{**asdict(op), "elements": op.elements, "paper": op.paper_str()} for op in self.nonlinear]
        d["final_layernorm"] = {**asdict(self.final_layernorm), "elements": self.final_layernorm.elements}
        d["ffn_flops_paper"] = self.ffn_flops_str
        d["attn_flops_paper"] = self.attn_flops_str
        return d


def paper_billions(flops: int) -> str:
    """Format as the paper prints FLOPs: billions, rounded to 2 decimals then to 1 (half up)."""
    two = (Decimal(flops) / Decimal(10**9)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"{two.quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}B"


def pi_cost(cfg: ModelConfig, seq_len: int | None = None, preset: str | None = None) -> PICost:
    """The analytic cost of `cfg` on sequences of `seq_len` tokens (default: its block size)."""
    T = int(cfg.block_size if seq_len is None else seq_len)  # 0 is an error, not 'the default'
    if T <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if T > cfg.block_size:
        raise ValueError(f"seq_len={T} exceeds the model's block_size={cfg.block_size}")
    L, H, d, V = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size
    fused = cfg.ffn == "fused"

    nonlinear = [NonlinearOp("softmax", L * H, (T, T))]
    if cfg.norm == "layernorm":
        nonlinear.append(NonlinearOp("layernorm", 2 * L, (T, d)))
    if cfg.ffn_act != "none":
        nonlinear.append(NonlinearOp(cfg.ffn_act, L, (T, 4 * d)))

    # Paper convention (SPEC section 5).
    ffn_flops = (2 * T * d * d if fused else 2 * 2 * T * d * 4 * d) * L
    attn_flops = (8 * T * d * d + 3 * T * T * d) * L

    # Exact MACs per forward pass (full T x T attention square, as the secure forward runs it).
    macs = {
        "qkvo_projections": 4 * T * d * d * L,
        "attention_scores": T * T * d * L,  # Q.K^T, all heads together
        "attention_values": T * T * d * L,  # A.V
        "ffn": (T * d * d if fused else 2 * T * d * 4 * d) * L,
    }
    macs["blocks_total"] = sum(macs.values())

    elementwise = {}
    if cfg.attn_temperature:
        elementwise["temperature_scaling"] = H * T * (d // H) * L  # applied to q rows (see jax_forward)
    if cfg.ffn_scale:
        elementwise["ffn_beta_scaling"] = T * d * L

    return PICost(
        preset=preset, n_layer=L, n_head=H, n_embd=d, seq_len=T, vocab_size=V,
        nonlinear=nonlinear, final_layernorm=NonlinearOp("layernorm", 1, (T, d)),
        ffn_flops=ffn_flops, attn_flops=attn_flops, macs=macs,
        embedding_macs=T * V * d, head_macs=T * d * V, elementwise=elementwise,
    )


def load_model_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a run directory, a checkpoint directory or a config.json file
    (piformer.run_dir.read_model_config: the run's config.json, then best's, then last's)."""
    from ..run_dir import read_model_config

    return read_model_config(path)


def paper_row(preset: str, cfg: ModelConfig, seq_len: int) -> tuple[str, dict[str, Any]] | None:
    """The paper's table and row for this architecture and shape, if it printed one."""
    for table, t in PAPER_TABLES.items():
        size = {"gpt2-small": (12, 12, 768), "gpt2-18l": (18, 12, 768)}[t["size"]]
        if (cfg.n_layer, cfg.n_head, cfg.n_embd) == size and seq_len == t["seq_len"] and preset in t["rows"]:
            return table, t["rows"][preset]
    return None


def format_cost(cost: PICost) -> str:
    """A human-readable table of one cost."""
    lines = [
        f"architecture {cost.preset or '(from config)'}: L={cost.n_layer} H={cost.n_head} "
        f"d={cost.n_embd} T={cost.seq_len} V={cost.vocab_size}",
        "",
        "nonlinear operations (paper convention; final LayerNorm listed apart)",
    ]
    for op in cost.nonlinear:
        lines.append(f"  {op.kind:<10} {op.count:>5} x R^({op.shape[0]} x {op.shape[1]})"
                     f"   {op.elements:>14,d} elements   [{op.paper_str()}]")
    f = cost.final_layernorm
    lines.append(f"  (final LayerNorm: 1 x R^({f.shape[0]} x {f.shape[1]}), not counted by the paper)")
    lines += [
        "",
        "FLOPs (paper convention)",
        f"  FFN   {cost.ffn_flops_str:>7}   ({cost.ffn_flops:,d})",
        f"  Attn  {cost.attn_flops_str:>7}   ({cost.attn_flops:,d})",
        "",
        "multiply-accumulates (exact, transformer blocks)",
    ]
    for k, v in cost.macs.items():
        lines.append(f"  {k:<18} {v:>16,d}")
    lines += [
        "  listed apart:",
        f"  {'embedding (1-hot)':<18} {cost.embedding_macs:>16,d}   (T x V x d; a plaintext lookup is free)",
        f"  {'vocab projection':<18} {cost.head_macs:>16,d}   (T x d x V)",
    ]
    for k, v in cost.elementwise.items():
        lines.append(f"  {k:<18} {v:>16,d}   (elementwise products)")
    return "\n".join(lines)
