"""`PiformerConfig`: the transformers config of an exported piformer model.

This file and `modeling_piformer.py` are copied into every exported model directory (named in
config.json's `auto_map`), so they may import only torch and transformers: with
``trust_remote_code=True`` a user without piformer installed loads the model from them.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class PiformerConfig(PretrainedConfig):
    """A GPT-2 style decoder with piformer's variants, in inference form.

    Weight and spectral normalisation are folded into plain weights and the temperature is stored
    as t itself, so only the fields that change the forward pass remain. Field meanings are those
    of `piformer.config.ModelConfig`.
    """

    model_type = "piformer"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "n_positions",
    }

    def __init__(
        self,
        vocab_size: int = 50304,
        n_positions: int = 128,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        bias: bool = True,
        norm: str = "layernorm",
        ffn_act: str = "gelu",
        ffn: str = "standard",
        ffn_scale: bool = False,
        attn_temperature: bool = False,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        bos_token_id: int | None = 0,
        eos_token_id: int | None = 0,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        if norm not in ("layernorm", "none"):
            raise ValueError(f"PiformerConfig.norm: unknown value {norm!r}; valid: 'layernorm', 'none'")
        if ffn_act not in ("gelu", "relu", "none"):
            raise ValueError(f"PiformerConfig.ffn_act: unknown value {ffn_act!r}; valid: 'gelu', 'relu', 'none'")
        if ffn not in ("standard", "fused"):
            raise ValueError(f"PiformerConfig.ffn: unknown value {ffn!r}; valid: 'standard', 'fused'")
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.bias = bias
        self.norm = norm
        self.ffn_act = ffn_act
        self.ffn = ffn
        self.ffn_scale = ffn_scale
        self.attn_temperature = attn_temperature
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        # Every forward recomputes the whole context (contexts are short: n_positions tokens).
        kwargs.setdefault("use_cache", False)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
