"""Entropy analysis of any HF `transformers` causal LM on disk (GPT-2 family and friends).

The model is loaded from a local directory only (nothing is downloaded), with eager attention so
that ``output_attentions=True`` returns the probabilities; Eq. 7 is computed from them exactly as
for piformer's own models. `transformers` is optional: it is imported only here, on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..regularizer import hf_layer_windows
from .measure import entropy_from_attentions

INSTALL_HINT = "pip install transformers  (or: pip install 'piformer[hf]')"


def is_hf_model_dir(path: str | Path) -> bool:
    """A directory with a HF `config.json` (one that names a `model_type`) and weights."""
    p = Path(path)
    cfg = p / "config.json"
    if not cfg.is_file() or (p / "checkpoints").is_dir():
        return False
    try:
        d = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and "model_type" in d


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"analysing a HF transformers model needs the optional package 'transformers': {INSTALL_HINT}"
        ) from None
    import piformer.hf  # noqa: F401  registers PiformerForCausalLM, so piformer's own exports load too

    return transformers


def load_hf_causal_lm(path: str | Path, device: str | torch.device = "cpu"):
    """Load a causal LM from a local directory with eager attention, in eval mode."""
    p = Path(path)
    if not is_hf_model_dir(p):
        raise FileNotFoundError(f"{p} is not a HF model directory (expected config.json with a model_type)")
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(
            str(p), attn_implementation="eager", local_files_only=True
        )
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load {p} as a transformers causal LM: {err}") from None
    return model.to(device).eval()


def hf_context_length(model) -> int | None:
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def hf_sliding_window(config) -> int | None:
    """The one sliding-window span shared by every layer (Mistral), else None (full attention, or
    a mix of sliding and full layers, which one model-wide ceiling cannot describe)."""
    windows = set(hf_layer_windows(config))
    return windows.pop() if len(windows) == 1 else None


def hf_entropy_fn(model):
    """A callable ``idx (B, T) -> (L, H)`` giving the batch's Eq. 7 entropies from eager attentions."""

    @torch.no_grad()
    def fn(idx: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=idx, output_attentions=True, use_cache=False)
        attentions = getattr(out, "attentions", None)
        if not attentions or any(a is None for a in attentions):
            raise ValueError(
                f"{type(model).__name__} returned no attention probabilities with output_attentions=True; "
                "only models whose eager attention exposes them can be analysed"
            )
        return entropy_from_attentions(attentions)

    return fn


def hf_tokenize_text(path: str | Path, model_dir: str | Path, seq_len: int, batch_size: int,
                     max_batches: int | None) -> list[torch.Tensor]:
    """Tokenize a text file with the model directory's own tokenizer into ``(B, seq_len)`` windows."""
    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{model_dir} holds no usable tokenizer for --text ({err}); pass --data with pre-tokenized ids instead"
        ) from None
    ids = tok(Path(path).read_text(errors="replace"))["input_ids"]
    n_win = len(ids) // seq_len
    if n_win < 1:
        raise ValueError(f"{path} gives {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    t = torch.tensor(ids[: n_win * seq_len], dtype=torch.long).view(n_win, seq_len)
    batches = list(t.split(batch_size))
    return batches if max_batches is None else batches[:max_batches]


def hf_model_info(model) -> dict[str, Any]:
    cfg = model.config
    return {"model_type": getattr(cfg, "model_type", None), "architectures": getattr(cfg, "architectures", None)}
