"""`export_hf`: a piformer run or checkpoint as a Hugging Face model directory.

    export_hf("runs/baseline", "hf/baseline")   # -> GPT2LMHeadModel (Pre-LN presets)
    export_hf("runs/ereg", "hf/ereg")           # -> PiformerForCausalLM (every other preset)

The directory holds config.json, model.safetensors, generation_config.json and the run's
tokenizer (tokenizer.json + tokenizer_config.json, a PreTrainedTokenizerFast). A piformer-class
export also holds configuration_piformer.py and modeling_piformer.py, named in config.json's
auto_map, so `trust_remote_code=True` loads it without piformer; with piformer installed,
`import piformer.hf` registers the classes and no remote code is needed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from ..config import ModelConfig
from ..data.tokenizer import EOT, load_tokenizer
from ..evaluate import run_tokenizer_path
from ..model import PiGPT
from .gpt2 import gpt2_config_kwargs, gpt2_incompatibilities, pigpt_to_gpt2

FORMATS = ("auto", "gpt2", "piformer")
_CODE_FILES = ("configuration_piformer.py", "modeling_piformer.py")
AUTO_MAP = {
    "AutoConfig": "configuration_piformer.PiformerConfig",
    "AutoModelForCausalLM": "modeling_piformer.PiformerForCausalLM",
}


@dataclass
class ExportResult:
    out: Path
    format: str
    """'gpt2' (GPT2LMHeadModel) or 'piformer' (PiformerForCausalLM)."""
    checkpoint: Path
    tokenizer: Path | None
    """The tokenizer.json exported beside the model (None when none was found)."""
    max_abs_diff: float
    """Largest |logit difference| between piformer and the exported model on a random batch."""
    dropped: list[str]
    """Tensors that only shape training (the entropy regulariser's thresholds)."""


def hf_tokenizer(tokenizer_json: str | Path, max_length: int):
    """The piformer tokenizer as a transformers PreTrainedTokenizerFast (EOT is bos, eos and pad)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=load_tokenizer(tokenizer_json), bos_token=EOT, eos_token=EOT, unk_token=EOT,
        pad_token=EOT, model_max_length=max_length, clean_up_tokenization_spaces=False,
    )


def _portable_tokenizer_class(path: Path) -> None:
    """transformers 5 records its own backend class name, which 4.x cannot resolve; the fast
    tokenizer's class name loads under both."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


@contextlib.contextmanager
def quiet_transformers():
    """No progress bar from save_pretrained: the CLI prints its own summary."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def to_hf_model(model: PiGPT, format: str = "auto", eot_id: int | None = None):
    """(hf_model, format, dropped): a transformers model computing what `model` computes.

    format 'auto' picks GPT2LMHeadModel where the architecture allows and PiformerForCausalLM
    otherwise; 'gpt2' raises ValueError naming what GPT-2 cannot express.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from .configuration_piformer import PiformerConfig
    from .modeling_piformer import PiformerForCausalLM

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    cfg: ModelConfig = model.config
    reasons = gpt2_incompatibilities(cfg)
    if format == "gpt2" and reasons:
        raise ValueError("cannot export as GPT2LMHeadModel: " + "; ".join(reasons) + " (use --format piformer)")
    if format == "auto":
        format = "piformer" if reasons else "gpt2"

    state = _folded_state(model)
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the checkpoint holds non-finite weights ({', '.join(bad[:3])}): a diverged model "
                         "cannot be exported; export an earlier checkpoint (e.g. --checkpoint best)")
    dropped = sorted(k for k in state if k.endswith(".reg_threshold"))
    state = {k: v for k, v in state.items() if k not in dropped and k != "lm_head.weight"}
    ids = dict(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    if format == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(**gpt2_config_kwargs(cfg), **ids))
        state = pigpt_to_gpt2(state, cfg)
    else:
        hf = PiformerForCausalLM(PiformerConfig(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, bias=cfg.bias, norm=cfg.norm, ffn_act=cfg.ffn_act, ffn=cfg.ffn,
            ffn_scale=cfg.ffn_scale, attn_temperature=cfg.attn_temperature, initializer_range=cfg.init_std, **ids))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:  # a mapping bug, not bad input
        raise RuntimeError(f"export mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    return hf.eval(), format, dropped


def _folded_state(model: PiGPT) -> dict[str, torch.Tensor]:
    """The state dict of a folded copy (the caller's model keeps its parametrisations)."""
    # A fresh model, not a deepcopy: parametrised modules share their generated class with their
    # copies, and removing a parametrisation from one would break the other.
    folded = PiGPT(model.config)
    folded.load_state_dict(model.state_dict())
    folded = folded.float().eval().fold_static_norms()
    return {k: v.detach().contiguous() for k, v in folded.state_dict().items()}


@torch.no_grad()
def max_logit_diff(model: PiGPT, hf_model, batch: int = 2, length: int = 32, seed: int = 0) -> float:
    """Largest |logit difference| of the two models on random token ids."""
    g = torch.Generator().manual_seed(seed)
    T = min(length, model.config.block_size)
    idx = torch.randint(0, model.config.vocab_size, (batch, T), generator=g)
    ours = model.cpu().float().eval()(idx).logits
    theirs = hf_model(input_ids=idx).logits
    return float((ours - theirs).abs().max())


def export_hf(source: str | Path, out: str | Path, which: str = "best", format: str = "auto",
              tokenizer: str | Path | None = None, force: bool = False) -> ExportResult:
    """Export the checkpoint `source` (a run directory or a checkpoint directory) to `out`.

    The tokenizer is the run's (its data directory's tokenizer.json) unless `tokenizer` names
    one. The export is checked before it is written: the two models' logits are compared on a
    random batch (ExportResult.max_abs_diff).
    """
    source, out = Path(source), Path(out)
    ckpt = ckpt_io.resolve_checkpoint(source, which)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"{out} already exists and is not empty; choose another --out or pass --force")
    tok_path = Path(tokenizer) if tokenizer is not None else run_tokenizer_path(source, which)
    tok = load_tokenizer(tok_path) if tok_path is not None else None
    if tok_path is not None and tok_path.is_dir():
        tok_path = tok_path / "tokenizer.json"

    model = ckpt_io.load_model(ckpt)
    if tok is not None and tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tok.get_vocab_size()} tokens but the model only "
                         f"{model.config.vocab_size}: it is not the tokenizer this model was trained with")
    eot = tok.token_to_id(EOT) if tok is not None else None
    hf, fmt, dropped = to_hf_model(model, format, eot)
    diff = max_logit_diff(model, hf)
    hf.config.piformer = {"checkpoint": ckpt.name, "model_config": model.config.to_dict()}  # provenance
    if fmt == "piformer":
        hf.config.auto_map = dict(AUTO_MAP)

    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_transformers():
            hf.save_pretrained(tmp)
        if fmt == "piformer":
            for name in _CODE_FILES:
                shutil.copyfile(Path(__file__).with_name(name), tmp / name)
        if tok is not None:
            hf_tokenizer(tok_path, model.config.block_size).save_pretrained(tmp)
            _portable_tokenizer_class(tmp / "tokenizer_config.json")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, fmt, ckpt, tok_path, diff, dropped)
