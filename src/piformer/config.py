"""Configuration: one dataclass per concern, the paper's named presets, strict parsing.

Every field carries a docstring (the string literal under it), so ``describe(ModelConfig)``
and ``piformer presets`` can print what each field means. Unknown keys, presets or
values are errors that list what would be valid.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------
# Model


NORMS = ("layernorm", "none")
FFN_ACTS = ("gelu", "relu", "none")
FFN_KINDS = ("standard", "fused")
NORM_GROUPS = ("qk", "qkv", "qkvo", "ffn")
REG_MODES = ("query", "head")
REG_REDUCTIONS = ("sum", "mean")
TEMPERATURE_PARAMS = ("exp", "raw")
# Loss settings that older checkpoints kept in ModelConfig; they now live in TrainConfig.
_LEGACY_LOSS_FIELDS = ("reg_lambda", "reg_gamma", "reg_mode")


@dataclass
class ModelConfig:
    """A GPT-2 style Pre-LN decoder and the paper's nonlinearity-reduced variants."""

    n_layer: int = 12
    """Number of transformer blocks (L)."""
    n_head: int = 12
    """Attention heads per block (H)."""
    n_embd: int = 768
    """Model width (d). Must be divisible by n_head."""
    block_size: int = 128
    """Context length (T): the longest sequence the model accepts; sizes the position table."""
    vocab_size: int = 50304
    """Vocabulary size (V). The input embedding is tied to the output head."""
    bias: bool = True
    """Biases in the linear layers (GPT-2 has them)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches (0 in the paper's recipe)."""

    norm: str = "layernorm"
    """LayerNorm inside blocks: 'layernorm' (LN1 before attention, LN2 before the FFN) or 'none'.
    The final LayerNorm before the head is always kept, as in the paper."""
    ffn_act: str = "gelu"
    """FFN activation: 'gelu', 'relu' or 'none' (a linear FFN)."""
    ffn: str = "standard"
    """FFN shape: 'standard' (d -> 4d -> d) or 'fused' (one d x d linear; needs ffn_act='none')."""
    ffn_scale: bool = False
    """Scaled FFN (ScFFN): X_out = beta * X_sa + FFN(X_sa) / alpha, with learnable alpha, beta per layer."""
    weight_norm: str = ""
    """Weight normalisation on linear layers: '' or '+'-joined groups of qk, qkv, qkvo, ffn (e.g. 'qk+ffn')."""
    spectral_norm: str = ""
    """Spectral normalisation on linear layers: same group syntax as weight_norm."""
    attn_temperature: bool = False
    """Learnable softmax temperature t of shape (H, T) per layer: softmax(q.k / (t * sqrt(d_k)))."""
    temperature_init: float = 1e-2
    """Initial value of every temperature (paper: 1e-2 on CodeParrot, 1e-1 on Languini)."""
    temperature_param: str = "exp"
    """How t is stored: 'exp' learns log t (t = exp(s) stays positive, so no row's attention ranking
    can invert); 'raw' learns t itself, unconstrained, as the paper's code does."""

    entropy_reg: bool = False
    """The entropy regulariser's learnable per-layer, per-head thresholds theta (Algorithm 1). The
    penalty's weight, tolerance and form are loss settings: TrainConfig.reg_*."""
    reg_threshold_init: float = 0.5
    """Initial threshold weight theta (target entropy = theta * log T). The paper does not state
    one; 0.5 puts the target in the middle of the band that well-behaved heads occupy
    (Figure 2a: ~90% of baseline heads lie in [max/4, 3max/4])."""

    init_std: float = 0.02
    """Standard deviation of the N(0, std) weight initialisation."""

    def __post_init__(self) -> None:
        self.validate()

    # -- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        _check_choice("norm", self.norm, NORMS)
        _check_choice("ffn_act", self.ffn_act, FFN_ACTS)
        _check_choice("ffn", self.ffn, FFN_KINDS)
        _check_choice("temperature_param", self.temperature_param, TEMPERATURE_PARAMS)
        for name in ("weight_norm", "spectral_norm"):
            parse_norm_groups(getattr(self, name), name)
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"ModelConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )
        if self.ffn == "fused" and self.ffn_act != "none":
            raise ValueError(
                "ModelConfig.ffn='fused' merges the FFN's two linears, which is only exact without an "
                f"activation; got ffn_act={self.ffn_act!r} (valid with 'fused': 'none')"
            )
        if self.temperature_init <= 0:
            raise ValueError(f"ModelConfig.temperature_init must be > 0, got {self.temperature_init}")

    # -- derived -----------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def weight_norm_layers(self) -> frozenset[str]:
        """Linear layers (q, k, v, o, ffn) under weight normalisation."""
        return parse_norm_groups(self.weight_norm, "weight_norm")

    @property
    def spectral_norm_layers(self) -> frozenset[str]:
        return parse_norm_groups(self.spectral_norm, "spectral_norm")

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "SM+LN+G", size: str = "gpt2-small", **overrides: Any) -> "ModelConfig":
        """The paper's architecture `name` (e.g. 'SM+ScFuFFN') at size `size` (e.g. 'cpu-small')."""
        values: dict[str, Any] = {}
        values.update(_lookup("size", size, SIZE_PRESETS))
        values.update(_lookup("preset", name, ARCH_PRESETS))
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> "ModelConfig":
        """A config read back from a checkpoint or run directory, including those written before
        the regulariser's loss settings left ModelConfig (they are dropped) and before
        `temperature_param` existed (those models stored t raw)."""
        d = dict(d)
        legacy = any(k in d for k in _LEGACY_LOSS_FIELDS)
        for k in _LEGACY_LOSS_FIELDS:
            d.pop(k, None)
        if legacy:
            d.setdefault("temperature_param", "raw")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ModelConfig":
        """From a JSON file, or from JSON text (a str starting with '{'). Text is never tried as a
        path: a config's JSON is longer than a file name may be, and Path.exists() raises on it."""
        if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
            return cls.from_dict(json.loads(path_or_text))
        return cls.from_dict(json.loads(Path(path_or_text).read_text()))


def parse_norm_groups(spec: str, field_name: str = "weight_norm") -> frozenset[str]:
    """'qk+ffn' -> {'q', 'k', 'ffn'}. Empty or 'none' -> empty set."""
    spec = (spec or "").strip().lower()
    if spec in ("", "none"):
        return frozenset()
    layers: set[str] = set()
    for group in spec.split("+"):
        if group not in NORM_GROUPS:
            raise ValueError(
                f"ModelConfig.{field_name}: unknown group {group!r} in {spec!r}; "
                f"valid groups: {', '.join(NORM_GROUPS)} (joined with '+', e.g. 'qk+ffn')"
            )
        layers.update(["ffn"] if group == "ffn" else list(group))  # "qkv" -> q, k, v
    return frozenset(layers)


# The paper's architectures (Table 1, Sections 2 and 4). Each is a set of ModelConfig fields.
_SM_ONLY = {"norm": "none", "ffn_act": "none"}
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "SM+LN+G": {"norm": "layernorm", "ffn_act": "gelu"},
    "SM+LN+R": {"norm": "layernorm", "ffn_act": "relu"},
    "SM+LN": {"norm": "layernorm", "ffn_act": "none"},
    "SM+G": {"norm": "none", "ffn_act": "gelu"},
    "SM+R": {"norm": "none", "ffn_act": "relu"},
    "SM": dict(_SM_ONLY),
}
for _kind, _field in (("WN", "weight_norm"), ("SN", "spectral_norm")):
    for _groups in ("QK", "FFN", "QK+FFN", "QKV+FFN", "QKVO+FFN"):
        ARCH_PRESETS[f"SM+{_kind}({_groups})"] = {**_SM_ONLY, _field: _groups.lower()}
ARCH_PRESETS["SM+ScFFN"] = {**_SM_ONLY, "ffn_scale": True}
ARCH_PRESETS["SM+ScFuFFN"] = {**_SM_ONLY, "ffn_scale": True, "ffn": "fused"}
ARCH_PRESETS["SM(t)+ScFuFFN"] = {**ARCH_PRESETS["SM+ScFuFFN"], "attn_temperature": True}
ARCH_PRESETS["EReg(SM(t)+ScFuFFN)"] = {**ARCH_PRESETS["SM(t)+ScFuFFN"], "entropy_reg": True}

SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 128},
    "gpt2-18l": {"n_layer": 18, "n_head": 12, "n_embd": 768, "block_size": 128},
    "cpu-small": {"n_layer": 6, "n_head": 8, "n_embd": 256, "block_size": 128},
    # The paper's second recipe (Languini books): GPT-2 small at T=512, temperatures from 1e-1.
    "languini": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 512, "temperature_init": 1e-1},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 97},
}


# ---------------------------------------------------------------------------------------
# Training and data


@dataclass(frozen=True)
class RegLoss:
    """The entropy regulariser's loss settings (TrainConfig.reg_*), as PiGPT.forward takes them.
    The defaults are the paper's CodeParrot setting in the form the authors trained with."""

    lam: float = 1e-5
    """lambda: weight of the penalty in the total loss."""
    gamma: float = 0.2
    """Tolerance as a fraction of log T."""
    mode: str = "query"
    """'query' (every query row, Appendix B code) or 'head' (query-averaged, Algorithm 1)."""
    reduction: str = "sum"
    """'sum' or 'mean' over the batch and query rows ('query' mode)."""


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults follow the CodeParrot recipe of the paper (SPEC section 4)."""

    max_steps: int = 32000
    """Optimizer steps to train for."""
    batch_size: int = 512
    """Sequences per optimizer step (across all processes and accumulation micro-steps)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward on one process; batch_size / (micro_batch_size * world) micro-steps accumulate."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    schedule: str = "linear"
    """Decay after warmup: 'linear' or 'cosine'."""
    warmup: float = 0.05
    """Warmup length: a fraction of max_steps if < 1, else a number of steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (never on norms, biases, gains, temperatures, thresholds, alpha/beta)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2 (Languini recipe: 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 1337
    """Seed for weights, data order and dropout."""
    eval_interval: int = 500
    """Evaluate validation loss every this many steps (and at the end)."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation."""
    log_interval: int = 50
    """Write a metrics.jsonl line (loss, lr, per-head entropy, thresholds, temperatures) every this many steps."""
    checkpoint_interval: int = 1000
    """Write the 'last' checkpoint every this many steps (and at the end)."""
    dtype: str = "auto"
    """Autocast dtype: 'auto' (bf16 on CUDA, fp32 on CPU), 'bf16', 'fp16' or 'fp32'."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu' or 'cuda'."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the tensorboard package)."""

    reg_lambda: float = 1e-5
    """Weight of the entropy penalty in the total loss (paper: 1e-5 CodeParrot, 5e-5 Languini).
    Acts only on models with entropy_reg."""
    reg_gamma: float = 0.2
    """Tolerance margin as a fraction of E_max = log T: deviations within gamma * log T are free."""
    reg_mode: str = "query"
    """What is compared with each head's threshold: 'query', every query row's entropy (the
    Appendix B code the authors trained with); 'head', the head's query-averaged entropy
    (Algorithm 1 as printed)."""
    reg_reduction: str = "sum"
    """How the per-row penalties of 'query' mode are reduced over the batch and query rows: 'sum'
    (the Appendix B code, the magnitude the paper's lambda was tuned for) or 'mean'. Then the
    mean over heads and over layers. 'head' mode takes 'mean' (there is nothing to sum)."""
    reg_grad_interval: int = 100
    """Every this many steps, log the ratio of the regulariser's gradient norm to the
    cross-entropy's on the attention weights (two extra backward passes; 0 disables)."""

    def __post_init__(self) -> None:
        _check_choice("reg_mode", self.reg_mode, REG_MODES, cls="TrainConfig")
        _check_choice("reg_reduction", self.reg_reduction, REG_REDUCTIONS, cls="TrainConfig")
        if self.reg_mode == "head" and self.reg_reduction != "mean":
            raise ValueError(
                "TrainConfig.reg_reduction='sum' needs reg_mode='query' (the head form penalises one "
                "query-averaged entropy per head: nothing to sum); use reg_reduction='mean' with reg_mode='head'"
            )
        if not self.reg_gamma >= 0:
            raise ValueError(f"TrainConfig.reg_gamma must be >= 0, got {self.reg_gamma}")
        if not self.reg_lambda >= 0:
            raise ValueError(f"TrainConfig.reg_lambda must be >= 0, got {self.reg_lambda}")
        _check_choice("schedule", self.schedule, ("linear", "cosine"), cls="TrainConfig")
        _check_choice("dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"), cls="TrainConfig")
        _check_choice("device", self.device, ("auto", "cpu", "cuda"), cls="TrainConfig")
        for name in ("max_steps", "batch_size", "micro_batch_size", "eval_interval", "eval_batches",
                     "log_interval", "checkpoint_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.reg_grad_interval < 0:
            raise ValueError(f"TrainConfig.reg_grad_interval must be >= 0 (0 disables), got {self.reg_grad_interval}")
        # `not x >= 0` also rejects NaN, which `x < 0` would let through.
        for name in ("lr", "eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("min_lr", "warmup", "weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr={self.min_lr} must not exceed lr={self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d)

    def reg_loss(self) -> "RegLoss":
        """The entropy regulariser's loss settings, as the model's forward takes them."""
        return RegLoss(self.reg_lambda, self.reg_gamma, self.reg_mode, self.reg_reduction)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The CodeParrot recipe is the dataclass default; small CPU sizes get a shorter, smaller one.
TRAIN_RECIPES: dict[str, dict[str, Any]] = {
    "gpt2-small": {},
    "gpt2-18l": {},
    # Languini (SPEC section 4): Adam betas (0.9, 0.95), cosine 6e-4 -> 6e-6 after 200 warm-up
    # steps, batch 128 sequences of 512 tokens; lambda 5e-5. Steps: 1.2B tokens / 65,536 per step.
    "languini": {
        "max_steps": 18311, "batch_size": 128, "micro_batch_size": 16, "lr": 6e-4, "min_lr": 6e-6,
        "schedule": "cosine", "warmup": 200, "beta2": 0.95, "reg_lambda": 5e-5,
    },
    "cpu-small": {
        "max_steps": 2000, "batch_size": 32, "micro_batch_size": 16, "lr": 1e-3,
        "eval_interval": 250, "eval_batches": 10, "log_interval": 25, "checkpoint_interval": 250,
    },
    "tiny": {
        "max_steps": 50, "batch_size": 8, "micro_batch_size": 8, "lr": 3e-3,
        "eval_interval": 25, "eval_batches": 2, "log_interval": 5, "checkpoint_interval": 25,
    },
}


def train_recipe(size: str, **overrides: Any) -> TrainConfig:
    """The default training recipe for a size preset, with overrides applied."""
    values = dict(_lookup("size", size, TRAIN_RECIPES))
    values.update(overrides)
    return TrainConfig.from_dict(values)


# ---------------------------------------------------------------------------------------
# Helpers


def _check_choice(name: str, value: Any, valid: tuple[str, ...], cls: str = "ModelConfig") -> None:
    if value not in valid:
        raise ValueError(f"{cls}.{name}: unknown value {value!r}; valid: {', '.join(map(repr, valid))}")


def _lookup(kind: str, name: str, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(table)}")
    return table[name]


def _from_dict(cls: type, d: dict[str, Any]):
    valid = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {', '.join(map(repr, unknown))}; "
            f"valid fields: {', '.join(valid)}"
        )
    return cls(**{k: _coerce(cls, valid[k], v) for k, v in d.items()})


def _coerce(cls: type, f: dataclasses.Field, value: Any) -> Any:
    """Turn CLI strings ('3e-4', 'true') into the field's type; reject what does not fit."""
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(
        str(f.type), None
    )
    if kind is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            return float(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{cls.__name__}.{f.name}: cannot read {value!r} as {kind.__name__}"
        ) from None


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring, read from the class source (litgpt-style field docs)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, str]]:
    """`['model.n_layer=4', 'train.lr=3e-4', 'reg_gamma=0.3']` -> {'model': {...}, 'train': {...}}.

    A key without a section prefix is looked up in ModelConfig, then TrainConfig.
    """
    out: dict[str, dict[str, str]] = {"model": {}, "train": {}}
    model_fields = {f.name for f in fields(ModelConfig)}
    train_fields = {f.name for f in fields(TrainConfig)}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if "." in key:
            section, name = key.split(".", 1)
            if section not in out:
                raise ValueError(f"--set {key}: unknown section {section!r}; valid sections: model, train")
        elif key in model_fields:
            section, name = "model", key
        elif key in train_fields:
            section, name = "train", key
        else:
            raise ValueError(
                f"--set {key}: unknown config key; valid keys: "
                + ", ".join([f"model.{k}" for k in sorted(model_fields)] + [f"train.{k}" for k in sorted(train_fields)])
            )
        valid = model_fields if section == "model" else train_fields
        if section == "model" and name in _LEGACY_LOSS_FIELDS:
            raise ValueError(f"--set {key}: the regulariser's loss settings are training settings now; use train.{name}")
        if name not in valid:
            raise ValueError(
                f"--set {key}: unknown {section} field {name!r}; valid {section} fields: {', '.join(sorted(valid))}"
            )
        out[section][name] = value
    return out


__all__ = [
    "ModelConfig", "TrainConfig", "RegLoss", "ARCH_PRESETS", "SIZE_PRESETS", "TRAIN_RECIPES",
    "train_recipe", "parse_norm_groups", "parse_overrides", "field_docs",
]
