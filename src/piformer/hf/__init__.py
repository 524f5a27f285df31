"""Hugging Face interop: export piformer models to `transformers`, and start training from GPT-2.

Importing this package registers `PiformerConfig` / `PiformerForCausalLM` (model_type
'piformer') with transformers' Auto classes, so an exported directory loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` without `trust_remote_code`.
`transformers` is an optional dependency (the `hf` extra); it is needed only here.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError:
    raise ImportError(
        "piformer.hf needs the optional package 'transformers': pip install transformers  (or: pip install 'piformer[hf]')"
    ) from None

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_piformer import PiformerConfig
from .modeling_piformer import PiformerForCausalLM
from .regularize import RegularizedCausalLM, RegularizedCausalLMOutput

AutoConfig.register(PiformerConfig.model_type, PiformerConfig, exist_ok=True)
AutoModelForCausalLM.register(PiformerConfig, PiformerForCausalLM, exist_ok=True)

__all__ = ["PiformerConfig", "PiformerForCausalLM", "RegularizedCausalLM", "RegularizedCausalLMOutput"]


def __getattr__(name: str):
    # EntropyRegTrainer needs `accelerate` (as any transformers.Trainer does): built on first use.
    if name == "EntropyRegTrainer":
        from .regularize import EntropyRegTrainer

        return EntropyRegTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
