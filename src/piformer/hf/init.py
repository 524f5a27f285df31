"""`init_from_pretrained`: start a piformer model from a Hugging Face GPT-2 checkpoint.

    model = PiGPT(cfg)
    report = init_from_pretrained(model, "path/to/gpt2")   # or "gpt2" if it is in the local HF cache

Every tensor of the model whose counterpart exists with the same shape is copied; the position
table is also taken when GPT-2's is longer (its first block_size rows). Everything else keeps
its fresh initialisation: a different vocabulary or width, layers beyond GPT-2's depth, and
what GPT-2 does not have (temperatures, thresholds, ScFFN's alpha/beta, a fused FFN, LayerNorms
of a LayerNorm-free model have nothing to take). Weight-normalised and spectrally normalised
linears receive the weight through their parametrisation (so spectral norm rescales it).
An exported piformer directory (model_type 'piformer') is accepted too: its names are PiGPT's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from ..fileio import atomic_write_text
from ..model import PiGPT
from .gpt2 import gpt2_to_pigpt


@dataclass
class InitReport:
    source: str
    taken: list[str] = field(default_factory=list)
    """Model tensors copied from the source (logical names: a parametrised weight is one tensor)."""
    initialised: dict[str, str] = field(default_factory=dict)
    """Model tensors left at their initialisation -> why."""
    unused: list[str] = field(default_factory=list)
    """Source tensors nothing took (extra layers, a mismatched shape)."""
    notes: list[str] = field(default_factory=list)
    """Partial takes, e.g. the first rows of a longer position table."""

    def lines(self) -> list[str]:
        out = [f"init-from {self.source}: took {len(self.taken)} tensors, initialised {len(self.initialised)}"]
        if self.taken:
            out.append("  took: " + ", ".join(_group(self.taken)))
        by_reason: dict[str, list[str]] = {}
        for name, why in self.initialised.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            out.append(f"  initialised ({why}): " + ", ".join(_group(names)))
        out += [f"  {note}" for note in self.notes]
        if self.unused:
            out.append(f"  not used from {self.source}: " + ", ".join(_group(self.unused)))
        return out


    def to_dict(self) -> dict:
        return {"source": self.source, "taken": self.taken, "initialised": self.initialised,
                "unused": self.unused, "notes": self.notes}

    def announce(self, run_dir: Path | None) -> None:
        """Print the report and keep it as RUN_DIR/init_from.json (None: say nothing, e.g. on
        the ranks of a DDP run other than 0)."""
        if run_dir is None:
            return
        print("\n".join(self.lines()), flush=True)
        atomic_write_text(Path(run_dir) / "init_from.json", json.dumps(self.to_dict(), indent=1) + "\n")


def _group(names: list[str]) -> list[str]:
    """'transformer.h.{0,1,2}.ln_1.weight' style: one entry per name pattern, layers listed."""
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.match(r"(.*\.h\.)(\d+)(\..*)", n)
        key = f"{m.group(1)}{{}}{m.group(3)}" if m else n
        groups.setdefault(key, []).append(m.group(2) if m else "")
    out = []
    for key, layers in groups.items():
        out.append(key.format("{" + ",".join(layers) + "}" if len(layers) > 1 else layers[0]) if "{}" in key else key)
    return out


def _logical_params(model: PiGPT) -> dict[str, tuple[torch.nn.Module, str]]:
    """Logical tensor name -> (module, attribute), with parametrised tensors under their plain name."""
    out = {}
    for mod_name, module in model.named_modules():
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())
        for attr in names:
            full = f"{mod_name}.{attr}" if mod_name else attr
            if ".parametrizations." in full or full == "lm_head.weight":  # raw pieces; the tied head
                continue
            out[full] = (module, attr)
    return out


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("--init-from needs the optional package 'transformers': pip install 'piformer[hf]'") from None
    from . import PiformerConfig  # noqa: F401  (registers model_type 'piformer')

    return transformers


def check_source(source: str | Path):
    """The source's transformers config, or a one-line error: cheap (no weights are read), so a
    bad --init-from fails before a run directory is written."""
    tf = _transformers()
    p = Path(source).expanduser()
    if not p.is_dir() and p.exists():
        raise ValueError(f"--init-from {source}: expected a Hugging Face model directory, got a file")
    try:
        config = tf.AutoConfig.from_pretrained(str(p) if p.is_dir() else str(source), local_files_only=True)
    except (OSError, ValueError) as err:
        if p.is_dir():
            raise FileNotFoundError(f"--init-from: {p} holds no readable Hugging Face config.json "
                                    f"({str(err).splitlines()[0]})") from None
        raise FileNotFoundError(
            f"--init-from: {source!r} is neither a directory nor a model in the local Hugging Face cache; nothing is "
            "downloaded: fetch it first (e.g. `huggingface-cli download gpt2`) or pass a local directory") from None
    if config.model_type not in ("gpt2", "piformer"):
        raise ValueError(f"--init-from {source}: model_type {config.model_type!r} is not supported; "
                         "valid: a GPT-2 checkpoint (model_type 'gpt2') or a piformer export ('piformer')")
    return config


def load_source_state(source: str | Path) -> dict[str, torch.Tensor]:
    """A GPT-2 (or exported piformer) checkpoint's tensors under PiGPT's names and layouts.

    `source` is a local directory, or a hub name such as 'gpt2' that must already be in the
    local Hugging Face cache (nothing is downloaded)."""
    from .export import quiet_transformers

    config = check_source(source)
    p = Path(source).expanduser()
    with quiet_transformers():
        hf = _transformers().AutoModelForCausalLM.from_pretrained(
            str(p) if p.is_dir() else str(source), local_files_only=True)
    state = {k: v.detach().float() for k, v in hf.state_dict().items()}
    return gpt2_to_pigpt(state) if config.model_type == "gpt2" else {k: v for k, v in state.items() if k != "lm_head.weight"}


@torch.no_grad()
def init_from_pretrained(model: PiGPT, source: str | Path) -> InitReport:
    """Copy into `model` every tensor of `source` that fits (see the module docstring)."""
    src = load_source_state(source)
    report = InitReport(str(source))
    used = set()
    for name, (module, attr) in _logical_params(model).items():
        current = getattr(module, attr)
        t = src.get(name)
        if t is None:
            report.initialised[name] = "not in the source"
            continue
        if name.endswith("wpe.weight") and t.shape[0] > current.shape[0] and t.shape[1:] == current.shape[1:]:
            report.notes.append(f"{name}: the first {current.shape[0]} of {t.shape[0]} positions")
            t = t[: current.shape[0]]
        if t.shape != current.shape:
            report.initialised[name] = "shape differs"
            continue
        t = t.to(device=current.device, dtype=current.dtype)
        if parametrize.is_parametrized(module, attr):
            setattr(module, attr, t)  # through right_inverse: WN's g and v, SN's weight, exp's log t
        else:
            current.copy_(t)
        report.taken.append(name)
        used.add(name)
    report.unused = sorted(k for k in src if k not in used)
    return report
