"""`PiformerForCausalLM`: piformer's models as a transformers-native causal LM.

Self-contained on purpose (torch and transformers only): `piformer export-hf` copies this file
and `configuration_piformer.py` into the exported directory, so the model also loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` where piformer is not
installed. Parameter names are those of `piformer.model.PiGPT` after `fold_static_norms()`, so
an export is a rename-free copy of the folded state dict.

The forward pass is the same computation as PiGPT's explicit-attention path:
  x_sa  = x + Attn(LN1(x))        Attn: softmax(q.k / (t[h, pos] sqrt(D))) with t = 1 unless attn_temperature
  x_out = x_sa + FFN(LN2(x_sa))   or, with ffn_scale, beta * x_sa + FFN(LN2(x_sa)) / alpha
LN1/LN2 are identities when norm='none'; FFN is d->4d->d with gelu/relu/identity, or one d x d
linear when ffn='fused'. There is no KV cache: every call (every generated token) recomputes
the context, which is at most n_positions tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_piformer import PiformerConfig

try:
    from transformers import initialization as init  # transformers >= 5: leaves loaded weights alone
except ImportError:  # transformers 4.x initialises only missing weights anyway
    from torch.nn import init

_TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])


def _norm(config: PiformerConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
    return nn.Identity()


class PiformerAttention(nn.Module):
    def __init__(self, config: PiformerConfig):
        super().__init__()
        C, H = config.n_embd, config.n_head
        self.n_head, self.head_dim = H, C // H
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        # t[h, i]: the softmax temperature of head h at query position i (stored as t, not log t).
        self.temperature = nn.Parameter(torch.ones(H, config.n_positions)) if config.attn_temperature else None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor):
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)
        if self.temperature is not None:
            t = self.temperature[:, position_ids].permute(1, 0, 2)  # (H, B, T) -> (B, H, T)
            q = q / t.to(q.dtype).unsqueeze(-1)
        scores = (q * (1.0 / math.sqrt(D))) @ k.transpose(-2, -1)  # (B, H, T, T)
        # A finite fill keeps fully masked rows (left padding) finite: they become uniform.
        scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)
        y = (probs.to(v.dtype) @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), probs


class PiformerMLP(nn.Module):
    def __init__(self, config: PiformerConfig):
        super().__init__()
        C = config.n_embd
        self.fused = config.ffn == "fused"
        if self.fused:
            self.c_fused = nn.Linear(C, C, bias=config.bias)
        else:
            self.c_fc = nn.Linear(C, 4 * C, bias=config.bias)
            self.c_proj = nn.Linear(4 * C, C, bias=config.bias)
        self.act = {"gelu": nn.GELU(approximate="tanh"), "relu": nn.ReLU(), "none": nn.Identity()}[config.ffn_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.c_fused(x)
        return self.c_proj(self.act(self.c_fc(x)))


class PiformerBlock(nn.Module):
    def __init__(self, config: PiformerConfig):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = PiformerAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = PiformerMLP(config)
        if config.ffn_scale:
            self.ffn_alpha = nn.Parameter(torch.ones(()))
            self.ffn_beta = nn.Parameter(torch.ones(()))
        else:
            self.ffn_alpha = self.ffn_beta = None

    def forward(self, x, position_ids, mask):
        a, probs = self.attn(self.ln_1(x), position_ids, mask)
        x = x + a
        f = self.mlp(self.ln_2(x))
        x = self.ffn_beta * x + f / self.ffn_alpha if self.ffn_alpha is not None else x + f
        return x, probs


class PiformerPreTrainedModel(PreTrainedModel):
    config_class = PiformerConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["PiformerBlock"]
    _supports_cache_class = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear, Embedding, LayerNorm
        if isinstance(module, PiformerAttention) and module.temperature is not None:
            init.ones_(module.temperature)
        if isinstance(module, PiformerBlock) and module.ffn_alpha is not None:
            init.ones_(module.ffn_alpha)
            init.ones_(module.ffn_beta)


class PiformerForCausalLM(PiformerPreTrainedModel, GenerationMixin):
    # transformers 5 names the tie target; 4.x takes the list of tied keys.
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"} if _TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]

    def __init__(self, config: PiformerConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList([PiformerBlock(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,  # use_cache, cache/past_key_values, ...: there is no cache to use
    ):
        """`labels` are the input ids (shifted inside, -100 ignored), as for every HF causal LM.
        Without `position_ids`, positions count the unmasked tokens of `attention_mask`, so a
        left-padded sequence sees the positions it would see alone."""
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)
        if int(position_ids.max()) >= self.config.n_positions:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond the model's context of n_positions="
                f"{self.config.n_positions} tokens; pass at most {self.config.n_positions} tokens"
            )
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().view(1, 1, T, T)
        if attention_mask is not None:
            mask = mask & attention_mask.bool().view(B, 1, 1, T)

        x = x + self.transformer.wpe(position_ids)
        hidden_states, attentions = [], []
        for block in self.transformer.h:
            if output_hidden_states:
                hidden_states.append(x)
            x, probs = block(x, position_ids, mask)
            if output_attentions:
                attentions.append(probs)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden_states.append(x)
        logits = self.lm_head(x)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(
            loss=loss, logits=logits,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: each step sees the whole sequence so far (positions come from the mask).
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if kwargs.get("output_attentions") is not None:
            inputs["output_attentions"] = kwargs["output_attentions"]
        return inputs
