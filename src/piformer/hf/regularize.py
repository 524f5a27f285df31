"""The entropy regulariser on any Hugging Face causal LM.

`RegularizedCausalLM` wraps a `transformers` causal LM and an `EntropyRegularizer` in one
`nn.Module`: its forward runs the model with ``output_attentions=True`` and returns
``loss = lm_loss + lam * penalty``, and its ``parameters()`` hold the model's weights and the
thresholds, so any optimizer (or `transformers.Trainer`) built on it trains both.

    model = AutoModelForCausalLM.from_pretrained("gpt2", attn_implementation="eager")
    reg_model = RegularizedCausalLM(model, lam=1e-5)
    optimizer = torch.optim.AdamW(reg_model.optim_groups(weight_decay=0.1), lr=1e-4)
    out = reg_model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()  # out.lm_loss, out.reg_loss, out.reg_outside for logging

`EntropyRegTrainer` is a `transformers.Trainer` for such a wrapper that keeps the thresholds out
of weight decay and logs lm_loss / reg_loss / reg_outside beside the loss (it needs `accelerate`,
as every Trainer does). Attention probabilities exist only with eager attention: the wrapper
refuses a model loaded with 'sdpa' or 'flash_attention_2' and says how to load it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from ..regularizer import EntropyRegularizer, hf_layer_windows


REGULARIZER_WEIGHTS = "entropy_regularizer.safetensors"
"""File name of the thresholds beside a Trainer checkpoint's model weights."""

ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")
"""Config fields that hold the attention-probability dropout in common HF architectures."""


@dataclass
class RegularizedCausalLMOutput(ModelOutput):
    """The wrapped model's output with the regulariser's terms (a `ModelOutput`, so a Trainer reads
    ``outputs["loss"]``)."""

    loss: torch.Tensor | None = None
    """lm_loss + lam * reg_loss (None without labels)."""
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    """The model's own language-modelling loss."""
    reg_loss: torch.Tensor | None = None
    """Unweighted entropy penalty."""
    reg_outside: torch.Tensor | None = None
    """Share of penalised measurements outside the tolerance band."""
    head_entropy: torch.Tensor | None = None
    """(L, H) mean attention entropy per head of this batch (detached)."""


class RegularizedCausalLM(nn.Module):
    """A HF causal LM plus the entropy regulariser, trained together.

    model: any `transformers` causal LM with eager attention.
    lam: weight of the penalty (the paper's CodeParrot value, 1e-5, is tuned for mode='query',
        reduction='sum'; with 'mean' or 'head' the penalty is ~T times smaller).
    regularizer: an `EntropyRegularizer`; by default one is built from the model's config
        (layers, heads, each layer's sliding window) with `regularizer_options`
        (gamma, mode, reduction, threshold_init, ceiling).
    """

    # The penalty is a per-batch mean, so a Trainer must not hand over num_items_in_batch (which
    # would make the LM loss a sum over accumulation steps while the penalty stays per batch):
    # it then averages both over gradient-accumulation steps alike.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, lam: float = 1e-5, regularizer: EntropyRegularizer | None = None,
                 **regularizer_options):
        super().__init__()
        cfg = getattr(model, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl != "eager":
            raise ValueError(
                f"RegularizedCausalLM needs attention probabilities, which only eager attention returns; "
                f"{type(model).__name__} uses {impl!r}: load it with attn_implementation='eager' "
                "or call model.set_attn_implementation('eager')"
            )
        if regularizer is None:
            n_head = getattr(cfg, "num_attention_heads", None)
            windows = hf_layer_windows(cfg)
            if not isinstance(n_head, int):
                raise ValueError(f"{type(cfg).__name__} names no num_attention_heads; pass regularizer=EntropyRegularizer(...)")
            regularizer = EntropyRegularizer(len(windows), n_head, window=windows, **regularizer_options)
        elif regularizer_options:
            raise ValueError(f"give either a regularizer or its options, not both: {sorted(regularizer_options)}")
        dropout = {k: getattr(cfg, k) for k in ATTENTION_DROPOUT_KEYS if (getattr(cfg, k, 0) or 0) > 0}
        if dropout:
            # eager attention returns the probabilities after dropout: in training the entropies
            # (and so the penalty) are then those of rows with dropped, rescaled entries
            warnings.warn(
                f"{type(model).__name__} has attention dropout {dropout}: in training the regulariser then "
                "measures the entropy of dropped-out rows; set it to 0 in the config for the exact penalty",
                stacklevel=2,
            )
        self.model = model
        self.regularizer = regularizer
        self.lam = float(lam)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> RegularizedCausalLMOutput:
        kwargs.pop("output_attentions", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         output_attentions=True, use_cache=False, **kwargs)
        reg = self.regularizer(out.attentions, attention_mask=attention_mask)
        loss = None if out.loss is None else out.loss + self.lam * reg.penalty
        return RegularizedCausalLMOutput(
            loss=loss, logits=out.logits, lm_loss=out.loss, reg_loss=reg.penalty,
            reg_outside=reg.outside, head_entropy=reg.head_entropy,
        )

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as PiGPT's: decay on the model's weight matrices (embeddings included, as
        nanoGPT does) only; never on biases, norms or the regulariser's thresholds."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            exempt = p.dim() < 2 or name.endswith("bias") or "norm" in name.lower() or ".ln_" in name
            (no_decay if exempt else decay).append(p)
        no_decay += [p for p in self.regularizer.parameters() if p.requires_grad]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def __getattr__(name: str):
    # The Trainer subclass is built on first use: importing transformers.Trainer is cheap, but
    # this module must stay importable (and the wrapper usable) without `accelerate`.
    if name == "EntropyRegTrainer":
        cls = _make_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_trainer():
    from transformers import Trainer

    from safetensors.torch import load_file, save_file

    class EntropyRegTrainer(Trainer):
        """A `transformers.Trainer` for a `RegularizedCausalLM`: thresholds without weight decay,
        and the mean lm_loss, reg_loss and reg_outside since the last log in every log line.

        A checkpoint holds the HF model as `save_pretrained` writes it (loadable on its own with
        `from_pretrained`) and the thresholds in entropy_regularizer.safetensors beside it;
        resuming and load_best_model_at_end read both. Single process or DDP (not DeepSpeed/FSDP).
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not isinstance(self.model, RegularizedCausalLM):
                raise ValueError(
                    f"EntropyRegTrainer trains a RegularizedCausalLM, got {type(self.model).__name__}: "
                    "wrap the model first, RegularizedCausalLM(model, lam=...)"
                )
            self._reg_sums: dict[str, torch.Tensor] = {}
            self._reg_count = 0

        def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
            return [n for n in super().get_decay_parameter_names(model) if not n.startswith("regularizer.")]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if model.training and isinstance(outputs, RegularizedCausalLMOutput):
                for key in ("lm_loss", "reg_loss", "reg_outside"):
                    value = outputs[key] if key in outputs else None
                    if value is not None:
                        self._reg_sums[key] = self._reg_sums.get(key, 0.0) + value.detach().float()
                self._reg_count += 1
            return (loss, outputs) if return_outputs else loss

        def _wrapper(self, model: nn.Module | None = None) -> RegularizedCausalLM:
            return self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            # Trainer's own fallback for a non-PreTrainedModel writes one state dict, which
            # safetensors refuses for tied weights (GPT-2's wte/lm_head) and from_pretrained
            # could not read: save the model the HF way and the thresholds beside it.
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            wrapper = self._wrapper()
            wrapper.model.save_pretrained(output_dir)
            save_file({k: v.detach().contiguous().cpu() for k, v in wrapper.regularizer.state_dict().items()},
                      os.path.join(output_dir, REGULARIZER_WEIGHTS))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            wrapper = self._wrapper(model)
            reg_file = os.path.join(resume_from_checkpoint, REGULARIZER_WEIGHTS)
            if not os.path.isfile(reg_file):
                raise FileNotFoundError(f"{resume_from_checkpoint} has no {REGULARIZER_WEIGHTS}: not an EntropyRegTrainer checkpoint")
            saved = type(wrapper.model).from_pretrained(resume_from_checkpoint, attn_implementation="eager")
            wrapper.model.load_state_dict(saved.state_dict())
            wrapper.regularizer.load_state_dict(load_file(reg_file, device=str(wrapper.regularizer.thresholds.device)))

        def _load_best_model(self) -> None:
            self._load_from_checkpoint(self.state.best_model_checkpoint)

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if self._reg_count and "loss" in logs:
                logs.update({k: round(float(v) / self._reg_count, 6) for k, v in self._reg_sums.items()})
                self._reg_sums, self._reg_count = {}, 0
            super().log(logs, *args, **kwargs)

    return EntropyRegTrainer


__all__ = ["RegularizedCausalLM", "RegularizedCausalLMOutput", "EntropyRegTrainer"]
