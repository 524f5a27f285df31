"""`piformer reproduce`: the whole study at one scale, resumable, ending in the report.

RUN_ROOT layout (each stage reads the previous stage's files, so any stage can be rerun alone):

  data/                     prepared corpus (meta.json marks it complete)
  runs/<slug>/              one training run per configuration (piformer.train's layout)
      eval.json             validation loss and perplexity
      entropy.json          per-head entropy, bands, diagnosis
      pi_cost.json          analytic PI cost at the run's shape; pi_cost_gpt2.json at the paper's
      pi_secure.json        measured two-party secure inference (configurations the tier affords)
  figures/                  entropy figures
  reproduce.json            tier, versions, machine, wall time, where everything is
  report.md, report.html, results.json
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text
from .config import ModelConfig, train_recipe

PAPER_CONFIGS = (
    "SM+LN+G", "SM+LN+R", "SM+LN", "SM+G", "SM+R", "SM",
    "SM+WN(FFN)", "SM+SN(FFN)", "SM+ScFFN", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)",
)
SECURE_CONFIGS = ("SM+LN+G", "SM+LN+R", "SM+ScFuFFN")


@dataclass
class Tier:
    """One scale of the study."""

    name: str
    note: str
    size: str
    """Size preset; `model` overrides individual fields."""
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    """Overrides of the size's training recipe."""
    data: dict[str, Any] = field(default_factory=dict)
    """Arguments of piformer.data.prepare (source, vocab_size, max_bytes, ...)."""
    presets: tuple[str, ...] = PAPER_CONFIGS
    secure_presets: tuple[str, ...] = SECURE_CONFIGS
    secure_seq_len: int = 16
    """Tokens per secure inference (the tier's affordable shape)."""
    entropy_batches: int = 8
    eval_batches: int | None = None
    """Validation batches (of 16 sequences) for the final perplexity; None scores the whole split."""
    smoke: bool = False
    """Numbers are a pipeline check only; the report says so."""


TIERS: dict[str, Tier] = {
    "quick": Tier(
        name="quick",
        note="tiny models (L=4, H=4, d=64, T=64) for 300 steps on a 3 MB slice of the built-in corpus; "
        "a smoke view that finishes in a few minutes on 2 CPU cores",
        size="tiny",
        model={"n_layer": 4, "n_head": 4, "n_embd": 64, "block_size": 64},
        train={"max_steps": 300, "batch_size": 16, "micro_batch_size": 16, "lr": 3e-3, "eval_interval": 100,
               "eval_batches": 8, "log_interval": 20, "checkpoint_interval": 100},
        data={"source": "builtin", "max_bytes": 3_000_000, "vocab_size": 2048},
        secure_seq_len=16,
        entropy_batches=4,
        eval_batches=40,
        smoke=True,
    ),
    "cpu": Tier(
        name="cpu",
        note="cpu-small models (L=6, H=8, d=256, T=128), 600 steps of 16 sequences (1.2M tokens) each, on the "
        "built-in corpus (Python standard library); a few hours on 2 CPU cores",
        size="cpu-small",
        train={"max_steps": 600, "batch_size": 16, "micro_batch_size": 16, "eval_interval": 100,
               "eval_batches": 10, "log_interval": 20, "checkpoint_interval": 100},
        data={"source": "builtin", "vocab_size": 8192},
        secure_seq_len=32,
        eval_batches=50,
    ),
    "gpt2": Tier(
        name="gpt2",
        note="the paper's scale: GPT-2 small (L=12, H=12, d=768, T=128) on CodeParrot with the paper's "
        "recipe (batch 512, ~32K steps); for a GPU",
        size="gpt2-small",
        data={"source": "codeparrot", "vocab_size": 50257},
        secure_seq_len=128,
        entropy_batches=32,
    ),
}


def slug(preset: str) -> str:
    """'EReg(SM(t)+ScFuFFN)' -> 'ereg-sm-t-scfuffn': a directory name that needs no quoting."""
    return re.sub(r"[^a-z0-9]+", "-", preset.lower()).strip("-")


def _versions() -> dict[str, str]:
    import numpy
    import torch

    from . import __version__

    v = {"piformer": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": numpy.__version__}
    from importlib.metadata import PackageNotFoundError, version

    try:
        v["spu"] = version("spu")
    except PackageNotFoundError:
        pass
    return v


def _machine() -> str:
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


class _Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()

    def stage(self, text: str) -> None:
        self.done += 1
        print(f"[reproduce {self.done}/{self.total} | {time.time() - self.t0:6.0f}s] {text}", flush=True)


def reproduce(
    tier: str | Tier = "quick",
    out: str | Path = "runs/quick",
    data: str | Path | None = None,
    presets: list[str] | None = None,
    max_steps: int | None = None,
    secure: bool = True,
) -> dict[str, Path]:
    """Run the study at `tier` into `out` and write the report. Reruns skip finished work."""
    if isinstance(tier, str) and tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; valid tiers: {', '.join(TIERS)}")
    t = TIERS[tier] if isinstance(tier, str) else tier
    if presets:
        from .config import ARCH_PRESETS

        bad = [p for p in presets if p not in ARCH_PRESETS]
        if bad:
            raise ValueError(f"unknown preset(s) {bad}; valid presets: {', '.join(ARCH_PRESETS)}")
        t = dataclasses.replace(t, presets=tuple(presets))
    if max_steps:
        t = dataclasses.replace(t, train={**t.train, "max_steps": int(max_steps)})
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    manifest_path = root / "reproduce.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest: dict[str, Any] = {
        "tier": {**dataclasses.asdict(t)},
        "versions": _versions(),
        "machine": _machine(),
        "started": old.get("started") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": {p: f"runs/{slug(p)}" for p in t.presets},
        "stages": old.get("stages", {}),
        "wall_s": old.get("wall_s", 0.0),
    }
    n_secure = len([p for p in t.secure_presets if p in t.presets]) if secure else 0
    progress = _Progress(1 + 4 * len(t.presets) + n_secure + 2)

    def save_manifest() -> None:
        manifest["wall_s"] = old.get("wall_s", 0.0) + (time.time() - started)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, default=str))

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.time()
        result = fn(*args, **kwargs)
        manifest["stages"][name] = round(time.time() - t0, 2)
        save_manifest()
        return result

    # 1. data
    data_dir = Path(data) if data else root / "data"
    if data:
        progress.stage(f"data: using {data_dir}")
    elif (data_dir / "meta.json").is_file():
        progress.stage(f"data: {data_dir} already prepared")
    else:
        from .data.prepare import prepare

        progress.stage(f"data: preparing {t.data.get('source', 'builtin')} into {data_dir}")
        timed("data", prepare, out_dir=data_dir, **t.data)
    from .data.shards import read_meta

    vocab_size = int(read_meta(data_dir)["vocab_size"])
    manifest["data_dir"] = str(data_dir)

    # 2. per configuration: train, evaluate, entropy, analytic cost
    for i, preset in enumerate(t.presets, 1):
        run = root / manifest["runs"][preset]
        tag = f"{preset} ({i}/{len(t.presets)})"
        cfg = ModelConfig.from_preset(preset, size=t.size, **{**t.model, "vocab_size": vocab_size})
        progress.stage(f"train {tag} -> {run}")
        timed(f"train:{preset}", _train_stage, preset, t, cfg, data_dir, run)
        if not _has_checkpoint(run):
            # A run that diverged before its first checkpoint has nothing to evaluate or analyse;
            # its status.json carries the outcome into the report.
            progress.done += 2
            progress.stage(f"{tag}: no checkpoint (diverged at step "
                           f"{json.loads((run / 'status.json').read_text()).get('step')}); only analytic cost")
            _cost_stage(run, preset, cfg)
            continue
        progress.stage(f"evaluate {tag}")
        timed(f"eval:{preset}", _eval_stage, run, data_dir, t.eval_batches)
        progress.stage(f"entropy {tag}")
        timed(f"entropy:{preset}", _entropy_stage, run, data_dir, t.entropy_batches)
        progress.stage(f"PI cost {tag}")
        _cost_stage(run, preset, cfg)

    # 3. secure inference where the tier affords it
    if secure:
        for preset in [p for p in t.secure_presets if p in t.presets]:
            run = root / manifest["runs"][preset]
            if not _has_checkpoint(run):
                progress.stage(f"secure inference {preset}: no checkpoint, skipped")
                continue
            progress.stage(f"secure inference (SPU) {preset}, T={t.secure_seq_len}")
            timed(f"secure:{preset}", _secure_stage, run, data_dir, t.secure_seq_len)

    # 4. figures and report
    progress.stage("figures")
    analysed = [root / manifest["runs"][p] for p in t.presets if (root / manifest["runs"][p] / "entropy.json").is_file()]
    manifest["figures"] = timed("figures", _figures_stage, root, analysed)
    progress.stage("report")
    save_manifest()
    from .report import build

    paths = build(root)
    print(f"report: {paths['html']} and {paths['md']}", flush=True)
    return paths


# ---------------------------------------------------------------------------------------
# Stages. Each skips work whose output is already on disk.


def _has_checkpoint(run: Path) -> bool:
    from .checkpoint import resolve_checkpoint

    try:
        resolve_checkpoint(run)
        return True
    except FileNotFoundError:
        return False


def _train_stage(preset: str, tier: Tier, cfg: ModelConfig, data_dir: Path, run: Path) -> None:
    from .train import train

    status = json.loads((run / "status.json").read_text()) if (run / "status.json").is_file() else {}
    if status.get("status") in ("finished", "diverged"):
        print(f"  already {status['status']} at step {status.get('step')}", flush=True)
        return
    resume = (run / "config.json").is_file()  # train() also resumes a run killed before its first checkpoint
    train_cfg = train_recipe(tier.size, **tier.train)
    train(cfg, train_cfg, data_dir, run, resume=resume, preset=preset, size=tier.size)


def _eval_stage(run: Path, data_dir: Path, max_batches: int | None) -> None:
    if (run / "eval.json").is_file():
        return
    from .train import evaluate_run

    # Scores the best checkpoint; a diverged run's best is its last good one, and the report
    # shows it as diverged (the paper's NaN) with this number kept for reference.
    result = evaluate_run(run, data_dir, max_batches=max_batches)
    atomic_write_text(run / "eval.json", json.dumps(result, indent=1))


def _entropy_stage(run: Path, data_dir: Path, batches: int) -> None:
    if (run / "entropy.json").is_file():
        return
    from .analysis.runs import analyse_run

    result = analyse_run(run, data_dir=data_dir, batches=batches)
    atomic_write_text(run / "entropy.json", json.dumps(result.to_dict(), indent=1))


def _cost_stage(run: Path, preset: str, cfg: ModelConfig) -> None:
    from .pi.cost import pi_cost

    atomic_write_text(run / "pi_cost.json", json.dumps(pi_cost(cfg, preset=preset).to_dict(), indent=1))
    paper_shape = ModelConfig.from_preset(preset, size="gpt2-small", vocab_size=50257)
    atomic_write_text(run / "pi_cost_gpt2.json", json.dumps(pi_cost(paper_shape, preset=preset).to_dict(), indent=1))


def _secure_stage(run: Path, data_dir: Path, seq_len: int) -> None:
    if (run / "pi_secure.json").is_file():
        return
    import numpy as np

    from .checkpoint import load_model
    from .data.shards import TokenData
    from .pi.jax_forward import state_dict_to_numpy
    from .pi.secure import run_secure

    model = load_model(run)
    ids = np.asarray(TokenData(data_dir).val[:seq_len], dtype=np.int64)  # the client's prompt
    report = run_secure(state_dict_to_numpy(model), model.config, ids)
    atomic_write_text(run / "pi_secure.json", json.dumps(report.to_dict(), indent=1, default=str))


def _figures_stage(root: Path, runs: list[Path]) -> dict[str, str]:
    from .analysis.figures import make_all_figures

    paths = make_all_figures(runs, root / "figures")
    return {k: str(Path(v).resolve().relative_to(root.resolve())) for k, v in paths.items()}

