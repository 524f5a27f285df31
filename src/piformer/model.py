"""PiGPT: a GPT-2 Pre-LN decoder and the paper's nonlinearity-reduced variants, in one file.

Every variant is a `ModelConfig` field, not a subclass:
  norm             'layernorm' | 'none'       LN1/LN2 inside blocks (ln_f is always kept)
  ffn_act          'gelu' | 'relu' | 'none'   FFN activation
  ffn              'standard' | 'fused'       d->4d->d, or one d x d linear (needs ffn_act='none')
  ffn_scale        X_out = beta * X_sa + FFN(X_sa) / alpha                    (ScFFN)
  weight_norm      '' | 'qk' | 'ffn' | 'qk+ffn' | 'qkv+ffn' | 'qkvo+ffn'       (WN)
  spectral_norm    same groups                                                  (SN)
  attn_temperature softmax(q.k / (t * sqrt(d_k))), t in R^{H x T} per layer     (SM(t))
                   (temperature_param='exp' learns log t, so t > 0)
  entropy_reg      learnable thresholds theta_l in R^H per layer for the entropy penalty (EReg);
                   the penalty's weight and form are loss settings (RegLoss, TrainConfig.reg_*)

Shapes: B batch, T sequence, C = n_embd, H heads, D = C / H head width, V vocabulary, L layers.
Parameter names follow nanoGPT/HF GPT-2 (transformer.h.{l}.attn..., lm_head tied to wte).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize

from .attention import attention_with_entropy, fused_entropy_unsupported, warn_fallback_once
from .config import ModelConfig, RegLoss
from .entropy import entropy_penalty, outside_tolerance, softmax_with_entropy
from .loss import chunked_loss_unsupported, full_cross_entropy, linear_cross_entropy, requested_loss

# What each attention layer computes (PiGPT.forward picks one per call):
FAST = "fast"  # fused SDPA: no entropies (plain training, inference)
ENTROPY = "entropy"  # fused attention that also returns row entropies (the regulariser, measurement)
EXPLICIT = "explicit"  # the (B, H, T, T) probabilities themselves (return_attention; the tests' oracle)


@dataclass
class ModelOutput:
    hidden: torch.Tensor
    """(B, T, C) final hidden states, after ln_f: the logits are lm_head(hidden)."""
    head: nn.Module = field(repr=False)
    """The output projection (lm_head) that maps `hidden` to logits."""
    loss: torch.Tensor | None = None
    """Training objective: ce_loss + reg_lambda * entropy penalty (when entropy_reg is on)."""
    ce_loss: torch.Tensor | None = None
    """Mean token cross-entropy, nats. Perplexity = exp(ce_loss)."""
    reg_loss: torch.Tensor | None = None
    """Unweighted entropy penalty (None when entropy_reg is off or no targets were given)."""
    reg_outside: torch.Tensor | None = None
    """0-d: share of the penalised heads (or query rows) outside their tolerance band, where the
    regulariser acts. 0 means its gradient is exactly 0 this step."""
    head_entropy: torch.Tensor | None = None
    """(L, H) attention entropy per head: mean over batch and query rows (Eq. 7)."""
    attentions: list[torch.Tensor] | None = None
    """Per layer (B, H, T, T) attention probabilities, when return_attention=True."""
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    """Stable names for analysis: 'blocks.{l}.attn.hook_pattern' (B, H, T, T) and
    'blocks.{l}.attn.hook_entropy' (B, H, T), row entropies, when return_attention=True."""
    _logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """(B, T, V) next-token logits. A forward with targets and gradients on computes its loss
        without them (piformer.loss); they are then computed here, on first read."""
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits


def _linear(config: ModelConfig, fan_in: int, fan_out: int) -> nn.Linear:
    return nn.Linear(fan_in, fan_out, bias=config.bias)


def _maybe_norm(config: ModelConfig) -> nn.Module:
    return nn.LayerNorm(config.n_embd, bias=config.bias) if config.norm == "layernorm" else nn.Identity()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        C, H, T = config.n_embd, config.n_head, config.block_size
        self.n_head, self.head_dim = H, config.head_dim
        self.q_proj = _linear(config, C, C)
        self.k_proj = _linear(config, C, C)
        self.v_proj = _linear(config, C, C)
        self.c_proj = _linear(config, C, C)
        self.dropout = config.dropout
        self.temperature = (
            nn.Parameter(torch.full((H, T), config.temperature_init)) if config.attn_temperature else None
        )
        if config.attn_temperature and config.temperature_param == "exp":
            # Stored as log t ('parametrizations.temperature.original'); reading .temperature gives t.
            parametrize.register_parametrization(self, "temperature", _Exp())
        self.reg_threshold = (
            nn.Parameter(torch.full((H,), config.reg_threshold_init)) if config.entropy_reg else None
        )
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)

    @property
    def temperature_leaf(self) -> nn.Parameter | None:
        """The tensor the optimiser updates: t ('raw') or log t ('exp')."""
        if parametrize.is_parametrized(self, "temperature"):
            return self.parametrizations.temperature.original
        return self.temperature

    @torch.no_grad()
    def set_temperature(self, t: torch.Tensor | float) -> None:
        """Set the temperatures to t (a scalar or anything that broadcasts to (H, T)), whatever
        their parametrisation."""
        leaf = self.temperature_leaf
        value = torch.broadcast_to(torch.as_tensor(t, dtype=leaf.dtype, device=leaf.device), leaf.shape)
        leaf.copy_(value.log() if leaf is not self.temperature else value)

    def forward(self, x: torch.Tensor, mode: str = FAST):
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        drop = self.dropout if self.training else 0.0
        # Three projections, not one concatenated (3C, C) weight: building that weight each call
        # and splitting its gradient back cost ~4% of a gpt2-small step (docs/training.md), and
        # every kernel below takes q, k and v as strided views.
        q, k, v = (p(x).view(B, T, H, D).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.temperature is not None:
            # Dividing q by t[h, i] divides row i's logits by t: the same as softmax(qk / (t sqrt(D))),
            # and it keeps the fused kernels usable.
            q = q / self.temperature[:, :T].to(q.dtype).unsqueeze(-1)  # (H, T, 1) broadcasts over B
        if mode == ENTROPY:
            reason = fused_entropy_unsupported(q, drop)
            if reason is not None:
                warn_fallback_once(reason)
                mode = EXPLICIT

        probs = row_ent = None
        if mode == FAST:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        elif mode == ENTROPY:
            y, row_ent = attention_with_entropy(q, k, v, 1.0 / math.sqrt(D))  # (B, H, T, D), (B, H, T)
        else:
            logits = (q * (1.0 / math.sqrt(D))) @ k.transpose(-2, -1)  # (B, H, T, T)
            # A finite fill (not -inf) makes masked probabilities exactly 0 with finite gradients.
            logits = logits.float().masked_fill_(~self.causal[:T, :T], torch.finfo(torch.float32).min)
            probs, row_ent = softmax_with_entropy(logits)  # (B, H, T, T), (B, H, T)
            y = F.dropout(probs, drop, self.training).to(v.dtype) @ v  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), probs, row_ent


class _Exp(nn.Module):
    """t = exp(s): a positive temperature learned in log space."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s.exp()

    def right_inverse(self, t: torch.Tensor) -> torch.Tensor:
        return t.log()


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.n_embd
        self.fused = config.ffn == "fused"
        if self.fused:
            self.c_fused = _linear(config, C, C)  # W_in W_out collapsed into one d x d map
        else:
            self.c_fc = _linear(config, C, 4 * C)
            self.c_proj = _linear(config, 4 * C, C)
        self.act = {"gelu": nn.GELU(approximate="tanh"), "relu": nn.ReLU(), "none": nn.Identity()}[config.ffn_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.c_fused(x)
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = _maybe_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _maybe_norm(config)
        self.mlp = MLP(config)
        self.resid_drop = nn.Dropout(config.dropout)
        if config.ffn_scale:
            self.ffn_alpha = nn.Parameter(torch.ones(()))
            self.ffn_beta = nn.Parameter(torch.ones(()))
        else:
            self.ffn_alpha = self.ffn_beta = None

    def forward(self, x: torch.Tensor, mode: str = FAST):
        a, probs, row_ent = self.attn(self.ln_1(x), mode)
        x = x + self.resid_drop(a)  # X_sa
        f = self.resid_drop(self.mlp(self.ln_2(x)))
        if self.ffn_alpha is not None:
            x = self.ffn_beta * x + f / self.ffn_alpha
        else:
            x = x + f
        return x, probs, row_ent


class PiGPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        self.apply(self._init_weights)
        self._apply_static_norms()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def _normed_linears(self, layers: frozenset[str]):
        for block in self.transformer.h:
            names = {"q": block.attn.q_proj, "k": block.attn.k_proj, "v": block.attn.v_proj, "o": block.attn.c_proj}
            for key in sorted(layers - {"ffn"}):
                yield names[key]
            if "ffn" in layers:
                yield from (m for m in block.mlp.children() if isinstance(m, nn.Linear))

    def _apply_static_norms(self) -> None:
        # Parametrised after initialisation, so WN's g starts at the initial row norms and SN
        # rescales the initial weights by their largest singular value.
        for lin in self._normed_linears(self.config.weight_norm_layers):
            parametrizations.weight_norm(lin, "weight", dim=0)
        for lin in self._normed_linears(self.config.spectral_norm_layers):
            parametrizations.spectral_norm(lin, "weight")

    @torch.no_grad()
    def fold_static_norms(self) -> "PiGPT":
        """Bake weight/spectral normalisation (and a log-space temperature) into plain tensors,
        what inference and PI run.

        After this the state_dict holds ordinary `...weight` and `...attn.temperature` tensors and
        outputs are unchanged.
        """
        was_training = self.training
        self.eval()  # spectral norm must not take another power-iteration step while folding
        for module in self.modules():
            for name in ("weight", "temperature"):
                if parametrize.is_parametrized(module, name):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        self.train(was_training)
        return self

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        return_entropy: bool = False,
        return_attention: bool = False,
        reg: RegLoss | None = None,
    ) -> ModelOutput:
        """`reg` sets the entropy penalty's weight and form (default: RegLoss(), the paper's);
        it acts only when the model has entropy_reg and targets are given."""
        B, T = idx.shape
        cfg = self.config
        if T > cfg.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's context block_size={cfg.block_size}; "
                f"pass at most {cfg.block_size} tokens"
            )
        regularise = cfg.entropy_reg and targets is not None
        need_entropy = return_entropy or return_attention or regularise
        mode = EXPLICIT if return_attention else ENTROPY if need_entropy else FAST

        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        attentions, row_entropies = [], []
        for block in self.transformer.h:
            x, probs, row_ent = block(x, mode)
            attentions.append(probs)
            row_entropies.append(row_ent)
        x = self.transformer.ln_f(x)  # (B, T, C)
        out = ModelOutput(hidden=x, head=self.lm_head)
        # Training reads only the loss: take it from x in chunks, never forming (B, T, V) logits.
        chunked = (targets is not None and torch.is_grad_enabled()
                   and chunked_loss_unsupported(x, self.lm_head.weight) is None and requested_loss() == "chunked")
        if not chunked:
            out._logits = self.lm_head(x)  # (B, T, V)
        if need_entropy:
            ent = torch.stack(row_entropies)  # (L, B, H, T)
            out.head_entropy = ent.mean(dim=(1, 3))  # (L, H), Eq. 7
        if return_attention:
            out.attentions = attentions
            for l, (p, e) in enumerate(zip(attentions, row_entropies)):
                out.cache[f"blocks.{l}.attn.hook_pattern"] = p
                out.cache[f"blocks.{l}.attn.hook_entropy"] = e
        if targets is not None:
            if chunked:
                # reshape, not view: targets may be a strided slice such as idx[:, 1:]
                out.ce_loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1))
            else:
                out.ce_loss = full_cross_entropy(out.logits, targets)
            out.loss = out.ce_loss
            if regularise:
                reg = reg or RegLoss()
                if reg.mode == "head":
                    measured, reduction = out.head_entropy, "mean"
                else:  # every query row of every sequence: (L, H, B*T)
                    measured, reduction = ent.permute(0, 2, 1, 3).reshape(cfg.n_layer, cfg.n_head, -1), reg.reduction
                thresholds = self.thresholds()
                out.reg_loss = entropy_penalty(measured, thresholds, T, reg.gamma, reduction)
                out.reg_outside = outside_tolerance(measured.detach(), thresholds.detach(), T, reg.gamma)
                out.loss = out.ce_loss + reg.lam * out.reg_loss
        return out

    # -- introspection ---------------------------------------------------------------------
    def thresholds(self) -> torch.Tensor | None:
        """(L, H) learnable threshold weights theta of the entropy regulariser, each layer its own."""
        if not self.config.entropy_reg:
            return None
        return torch.stack([b.attn.reg_threshold for b in self.transformer.h])

    def temperatures(self) -> torch.Tensor | None:
        """(L, H, T) learnable softmax temperatures."""
        if not self.config.attn_temperature:
            return None
        return torch.stack([b.attn.temperature for b in self.transformer.h])

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on weight matrices only; never on norms, biases, gains, temperatures,
        thresholds, FFN alpha/beta or weight-norm magnitudes."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exempt = (
                p.dim() < 2
                or name.endswith("bias")
                or ".ln_" in name
                or "temperature" in name
                or "reg_threshold" in name
                or "ffn_alpha" in name
                or "ffn_beta" in name
                or name.endswith("original0")  # weight norm's g
            )
            (no_decay if exempt else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Sample continuations of idx (B, T) -> (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.block_size :]
            logits = self(ctx).logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
