"""The tensor mapping between piformer's Pre-LN models and Hugging Face `GPT2LMHeadModel`.

The two compute the same function; they differ in layout. piformer keeps q, k, v as separate
`nn.Linear`s, whose weights are (out, in); GPT-2 fuses them into one `Conv1D` `c_attn`, whose
weight is (in, 3 * out) with columns [q | k | v]. Every other GPT-2 linear is a `Conv1D` too,
so each weight is transposed. GPT-2 always has biases: a bias-free piformer model maps to zeros.
Names on the piformer side are those of a folded model (`PiGPT.fold_static_norms`).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig

GPT2_ACTIVATION = {"gelu": "gelu_new", "relu": "relu", "none": "linear"}
"""piformer's ffn_act -> GPT2Config.activation_function ('gelu_new' is GELU's tanh form)."""


def gpt2_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Why `cfg` cannot be a GPT2LMHeadModel (empty if it can). Weight/spectral norms fold into
    plain weights and the entropy thresholds only shape the training loss, so neither prevents it."""
    reasons = []
    if cfg.norm != "layernorm":
        reasons.append("it has no LayerNorm inside its blocks (norm='none'); GPT-2 always applies ln_1 and ln_2")
    if cfg.ffn == "fused":
        reasons.append("its FFN is one fused d x d linear; GPT-2's is d -> n_inner -> d")
    if cfg.ffn_scale:
        reasons.append("its FFN is scaled (ffn_scale: beta * x + FFN(x) / alpha); GPT-2 adds the FFN output as is")
    if cfg.attn_temperature:
        reasons.append("it learns softmax temperatures (attn_temperature); GPT-2 divides by sqrt(d_head) only")
    return reasons


def gpt2_config_kwargs(cfg: ModelConfig) -> dict:
    """GPT2Config arguments describing `cfg` (which must have no incompatibilities)."""
    return dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=4 * cfg.n_embd, activation_function=GPT2_ACTIVATION[cfg.ffn_act],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        scale_attn_weights=True, tie_word_embeddings=True,
    )


def pigpt_to_gpt2(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A folded PiGPT state dict -> GPT2LMHeadModel's (lm_head left to the tie)."""
    C = cfg.n_embd

    def bias(name: str, n: int) -> torch.Tensor:
        return state.get(name, torch.zeros(n))

    out = {k: state[k] for k in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight")}
    out["transformer.ln_f.bias"] = bias("transformer.ln_f.bias", C)
    for l in range(cfg.n_layer):
        p = f"transformer.h.{l}."
        for ln in ("ln_1", "ln_2"):
            out[p + f"{ln}.weight"] = state[p + f"{ln}.weight"]
            out[p + f"{ln}.bias"] = bias(p + f"{ln}.bias", C)
        qkv = [p + f"attn.{x}_proj" for x in "qkv"]
        out[p + "attn.c_attn.weight"] = torch.cat([state[n + ".weight"] for n in qkv], 0).t().contiguous()
        out[p + "attn.c_attn.bias"] = torch.cat([bias(n + ".bias", C) for n in qkv])
        for name, n_out in (("attn.c_proj", C), ("mlp.c_fc", 4 * C), ("mlp.c_proj", C)):
            out[p + name + ".weight"] = state[p + name + ".weight"].t().contiguous()
            out[p + name + ".bias"] = bias(p + name + ".bias", n_out)
    return out


def gpt2_to_pigpt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel (or GPT2Model) state dict -> PiGPT names and layouts, every tensor it has."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        key = key if key.startswith("transformer.") else "transformer." + key  # GPT2Model has no prefix
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key.startswith("transformer.lm_head"):
            continue  # causal-mask buffers of older checkpoints; the head is tied to wte
        if ".attn.c_attn." in key:
            prefix, kind = key.split(".attn.c_attn.")
            parts = (t.t() if kind == "weight" else t).chunk(3, dim=0)
            for x, part in zip("qkv", parts):
                out[f"{prefix}.attn.{x}_proj.{kind}"] = part.contiguous()
        elif key.endswith(".weight") and any(s in key for s in (".attn.c_proj.", ".mlp.c_fc.", ".mlp.c_proj.")):
            out[key] = t.t().contiguous()  # Conv1D (in, out) -> Linear (out, in)
        else:
            out[key] = t
    return out
