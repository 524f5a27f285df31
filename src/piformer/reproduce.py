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
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import run_dir
from .fileio import atomic_write_text
from .config import ModelConfig, train_recipe

PAPER_CONFIGS = (
    "SM+LN+G", "SM+LN+R", "SM+LN", "SM+G", "SM+R", "SM",
    "SM+WN(FFN)", "SM+SN(FFN)", "SM+ScFFN", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)",
)
SECURE_CONFIGS = ("SM+LN+G", "SM+LN+R", "SM+ScFuFFN")
TWIN = "SM(t)+ScFuFFN"
"""The regularised model without its regulariser: what isolates the regulariser's effect."""
CLAIM_CONFIGS = ("SM+LN+G", "SM+ScFuFFN", TWIN, "EReg(SM(t)+ScFuFFN)")
"""The configurations the paper's headline claims compare; the cpu tier trains them with extra seeds."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study: a preset, optionally another seed or a variant of its config."""

    preset: str
    seed: int | None = None
    """None: the training recipe's seed."""
    variant: str = ""
    """A short tag for a non-default setting, e.g. 't=raw'; its runs are never pooled with the preset's."""
    model: dict[str, Any] = field(default_factory=dict)
    """ModelConfig overrides that make the variant."""

    @property
    def label(self) -> str:
        parts = [self.preset] + ([self.variant] if self.variant else []) + ([f"seed={self.seed}"] if self.seed is not None else [])
        return " ".join(parts)

    def __hash__(self) -> int:
        return hash(self.label)


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
    presets: tuple[str, ...] = PAPER_CONFIGS + (TWIN,)
    extra_seeds: tuple[int, ...] = ()
    """Seeds trained in addition to the recipe's, for the CLAIM_CONFIGS present in `presets`."""
    variants: tuple[RunSpec, ...] = ()
    """Further runs: a preset with some config fields changed (e.g. the raw temperature)."""
    jobs: int = 1
    """Runs trained (and evaluated) at once, each in its own process with cpu_count // jobs threads."""
    secure_presets: tuple[str, ...] = SECURE_CONFIGS
    secure_seq_len: int = 16
    """Tokens per secure inference (the tier's affordable shape)."""
    entropy_batches: int = 8
    eval_batches: int | None = None
    """Validation batches (of 16 sequences) for the final perplexity; None scores the whole split."""
    smoke: bool = False
    """Numbers are a pipeline check only; the report says so."""

    def run_specs(self) -> list[RunSpec]:
        """Every run of the tier, in training order: each preset, then extra seeds, then variants."""
        specs = [RunSpec(p) for p in self.presets]
        specs += [RunSpec(p, seed=s) for s in self.extra_seeds for p in CLAIM_CONFIGS if p in self.presets]
        specs += [v for v in self.variants if v.preset in self.presets]
        return specs


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
        note="6-layer, 4-head, width-128 models at T=64 on the built-in corpus (Python standard library, "
        "vocabulary 4096): 800 steps of 32 sequences (1.6M tokens), lr 2e-3 with 5% warm-up and linear decay; "
        "every configuration, the twin SM(t)+ScFuFFN, a second seed of the four claim configurations and the "
        "raw-temperature EReg variant (17 runs, two at a time), secure inference at T=32; under 2 hours on "
        "2 CPU cores",
        size="cpu-small",
        model={"n_layer": 6, "n_head": 4, "n_embd": 128, "block_size": 64},
        train={"max_steps": 800, "batch_size": 32, "micro_batch_size": 32, "lr": 2e-3, "warmup": 0.05,
               "eval_interval": 100, "eval_batches": 8, "log_interval": 20, "checkpoint_interval": 100,
               "reg_grad_interval": 50},
        data={"source": "builtin", "vocab_size": 4096},
        extra_seeds=(2,),
        variants=(RunSpec("EReg(SM(t)+ScFuFFN)", variant="t=raw", model={"temperature_param": "raw"}),),
        jobs=2,
        secure_seq_len=32,
        entropy_batches=8,
        eval_batches=40,
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
    jobs: int | None = None,
) -> dict[str, Path]:
    """Run the study at `tier` into `out` and write the report. Reruns skip finished work.

    `jobs` (default: the tier's) trains that many runs at once, each in its own process.
    """
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
    if jobs is not None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        t = dataclasses.replace(t, jobs=int(jobs))
    specs = t.run_specs()
    if secure and not _spu_available():
        from .pi.spu_backend import SPU_MISSING

        print(f"[reproduce] {SPU_MISSING}: secure inference is skipped; analytic PI costs are still computed",
              flush=True)
        secure = False
        manifest_note = ("secure inference skipped: SPU needs Python <= 3.11" if sys.version_info >= (3, 12)
                         else "secure inference skipped: SPU not installed (pip install 'piformer[pi]')")
    else:
        manifest_note = None
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
        "runs": {s.label: f"runs/{slug(s.label)}" for s in specs},
        "run_specs": {s.label: {"preset": s.preset, "seed": s.seed, "variant": s.variant, "model": s.model}
                      for s in specs},
        "stages": old.get("stages", {}),
        "wall_s": old.get("wall_s", 0.0),
    }
    if manifest_note:
        manifest["notes"] = [manifest_note]
    secure_runs = [p for p in t.secure_presets if p in t.presets] if secure else []
    progress = _Progress(1 + len(specs) + len(secure_runs) + 2)

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
    # Relative to the run root when inside it, so a copied or committed study still finds it.
    inside = data_dir.resolve().is_relative_to(root.resolve())
    manifest["data_dir"] = str(data_dir.resolve().relative_to(root.resolve()) if inside else data_dir.resolve())

    # 2. per run: train, evaluate, entropy, analytic cost (`jobs` runs at a time)
    work = [(s, t, vocab_size, data_dir, root / manifest["runs"][s.label]) for s in specs]
    if t.jobs <= 1:
        for item in work:
            progress.stage(f"run {item[0].label} -> {item[4]}")
            for name, seconds in _run_pipeline(*item, progress=True).items():
                manifest["stages"][name] = seconds
            save_manifest()
    else:
        import multiprocessing as mp
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // t.jobs)
        print(f"[reproduce] {len(work)} runs, {t.jobs} at a time, {threads} thread(s) each", flush=True)
        with ProcessPoolExecutor(t.jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_pipeline, *item, progress="lines"): item[0] for item in work}
            for fut in as_completed(futures):
                spec = futures[fut]
                for name, seconds in fut.result().items():
                    manifest["stages"][name] = seconds
                progress.stage(f"run {spec.label}: done")
                save_manifest()

    # 3. secure inference where the tier affords it
    if secure:
        for preset in secure_runs:
            run = root / manifest["runs"][RunSpec(preset).label]
            if not run_dir.has_checkpoint(run):
                progress.stage(f"secure inference {preset}: no checkpoint, skipped")
                continue
            progress.stage(f"secure inference (SPU) {preset}, T={t.secure_seq_len}")
            timed(f"secure:{preset}", _secure_stage, run, data_dir, t.secure_seq_len)

    # 4. figures and report
    progress.stage("figures")
    analysed = [root / manifest["runs"][s.label] for s in specs if (root / manifest["runs"][s.label] / run_dir.ENTROPY).is_file()]
    manifest["figures"] = timed("figures", _figures_stage, root, analysed)
    progress.stage("report")
    save_manifest()
    from .report import build

    paths = build(root)
    print(f"report: {paths['html']} and {paths['md']}", flush=True)
    return paths


# ---------------------------------------------------------------------------------------
# Stages. Each skips work whose output is already on disk.


def _spu_available() -> bool:
    from .pi.spu_backend import SPUMissingError, require_spu

    try:
        require_spu()
        return True
    except SPUMissingError:
        return False


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_pipeline(spec: RunSpec, tier: Tier, vocab_size: int, data_dir: Path, run: Path,
                  progress: bool | str = True) -> dict[str, float]:
    """Train one run, then evaluate it, measure its entropy and price it. Returns stage timings.
    Each stage skips work already on disk, so a rerun resumes where a kill left off."""
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args) -> None:
        t0 = time.time()
        fn(*args)
        timings[f"{name}:{spec.label}"] = round(time.time() - t0, 2)

    cfg = ModelConfig.from_preset(spec.preset, size=tier.size, **{**tier.model, **spec.model, "vocab_size": vocab_size})
    timed("train", _train_stage, spec, tier, cfg, data_dir, run, progress)
    if not run_dir.has_checkpoint(run):
        # A run that diverged before its first checkpoint has nothing to evaluate or analyse;
        # its status.json carries the outcome into the report.
        step = run_dir.read_status(run).get("step")
        print(f"  {spec.label}: no checkpoint (diverged at step {step}); only analytic cost", flush=True)
    else:
        timed("eval", _eval_stage, run, data_dir, tier.eval_batches)
        timed("entropy", _entropy_stage, run, data_dir, tier.entropy_batches)
    _cost_stage(run, spec.preset, cfg, tier.secure_seq_len)
    return timings


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _train_stage(spec: RunSpec, tier: Tier, cfg: ModelConfig, data_dir: Path, run: Path,
                 progress: bool | str = True) -> None:
    from .train import train

    status = run_dir.read_status(run)
    if status.get("status") in ("finished", "diverged"):
        print(f"  already {status['status']} at step {status.get('step')}", flush=True)
        return
    resume = run_dir.has_config(run)  # train() also resumes a run killed before its first checkpoint
    train_cfg = train_recipe(tier.size, **{**tier.train, **({"seed": spec.seed} if spec.seed is not None else {})})
    train(cfg, train_cfg, data_dir, run, resume=resume, preset=spec.preset, size=tier.size, progress=progress)


def _eval_stage(run: Path, data_dir: Path, max_batches: int | None) -> None:
    if (run / run_dir.EVAL).is_file():
        return
    from .train import evaluate_run

    # Scores the best checkpoint; a diverged run's best is its last good one, and the report
    # shows it as diverged (the paper's NaN) with this number kept for reference.
    result = evaluate_run(run, data_dir, max_batches=max_batches, device=_device())
    atomic_write_text(run / run_dir.EVAL, json.dumps(result, indent=1))


def _entropy_stage(run: Path, data_dir: Path, batches: int) -> None:
    if (run / run_dir.ENTROPY).is_file():
        return
    from .analysis.runs import analyse_run

    result = analyse_run(run, data_dir=data_dir, batches=batches, device=_device())
    atomic_write_text(run / run_dir.ENTROPY, json.dumps(result.to_dict(), indent=1))


def _cost_stage(run: Path, preset: str, cfg: ModelConfig, secure_seq_len: int) -> None:
    from .pi.cost import pi_cost
    from .pi.estimate import estimate
    from .pi.spu_backend import SPUSettings

    atomic_write_text(run / run_dir.PI_COST, json.dumps(pi_cost(cfg, preset=preset).to_dict(), indent=1))
    paper_shape = ModelConfig.from_preset(preset, size="gpt2-small", vocab_size=50257)
    atomic_write_text(run / run_dir.PI_COST_GPT2, json.dumps(pi_cost(paper_shape, preset=preset).to_dict(), indent=1))
    # The fitted estimator prices every configuration, SPU or not: at the paper's shape under both
    # settings, and at the run's own shape and T as the secure stage measures it (default settings).
    predicted = {
        "paper_shape": {name: estimate(paper_shape, 128, SPUSettings.preset(name)).to_dict()
                        for name in ("default", "optimised")},
        "run_shape": estimate(cfg, min(secure_seq_len, cfg.block_size), SPUSettings()).to_dict(),
    }
    atomic_write_text(run / run_dir.PI_ESTIMATE, json.dumps(predicted, indent=1))


def _secure_stage(run: Path, data_dir: Path, seq_len: int) -> None:
    if (run / run_dir.PI_SECURE).is_file():
        return
    import numpy as np

    from .data.shards import TokenData
    from .pi.secure import load_weights, run_secure

    cfg, sd = load_weights(str(run))
    ids = np.asarray(TokenData(data_dir).val[:seq_len], dtype=np.int64)  # the client's prompt
    report = run_secure(sd, cfg, ids)
    atomic_write_text(run / run_dir.PI_SECURE, json.dumps(report.to_dict(), indent=1, default=str))


def _figures_stage(root: Path, runs: list[Path]) -> dict[str, str]:
    from .analysis.curves import read_loss_curves
    from .analysis.figures import make_all_figures
    from .analysis.runs import load_or_analyse

    results = load_or_analyse(runs)  # analysis first; the figures only draw what it gives them
    paths = make_all_figures(results, root / "figures", curves=read_loss_curves(runs, results))
    return {k: str(Path(v).resolve().relative_to(root.resolve())) for k, v in paths.items()}

