"""Read run directories (config, metrics, status, checkpoint) and analyse them.

    results = analyse_paths(["runs/a", "runs/b"], data_dir="data/builtin", batches=8)

A path may be a piformer run directory (``config.json``, ``checkpoints/{best,last}/``,
``metrics.jsonl``, ``status.json``), a piformer checkpoint directory, or a HF `transformers`
model directory (analysed through eager attention; see `piformer.analysis.hf`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import run_dir as rd
from ..checkpoint import load_model, resolve_checkpoint
from .hf import hf_context_length, hf_entropy_fn, hf_sliding_window, hf_tokenize_text, is_hf_model_dir, load_hf_causal_lm
from .measure import measure_head_entropy, val_batches
from .result import EntropyHistory, EntropyResult, analyse_entropy, temperature_stats

METRICS, STATUS, RUN_CONFIG = rd.METRICS, rd.STATUS, rd.CONFIG
HF_DEFAULT_SEQ_LEN = 128
"""Context measured on HF models unless --seq-len says otherwise (the paper's T; capped by the model's)."""

# metrics.jsonl keys read for the entropy dynamics (first match wins)
_ENTROPY_KEYS = ("head_entropy", "attn_entropy", "entropy")
_STEP_KEYS = ("step", "iter", "iteration")


@dataclass
class RunInfo:
    """What a piformer run directory (or a bare checkpoint) records about itself."""

    path: Path
    """The run directory (or the checkpoint directory when given one alone)."""
    checkpoint: Path
    config: dict[str, Any] = field(default_factory=dict)
    """RUN_DIR/config.json (run-level: preset, size, model, train, data ...); {} if absent."""
    status: dict[str, Any] | None = None
    metrics_path: Path | None = None

    @property
    def preset(self) -> str | None:
        for key in ("preset", "arch", "architecture"):
            v = self.config.get(key)
            if isinstance(v, str) and v:
                return v
        return None

    def recorded_data_dir(self) -> Path | None:
        """The data directory the run was trained on, as recorded in its config.json, resolved."""
        return rd.recorded_data_dir(self.config, self.path)


def open_run(path: str | Path, which: str = "best") -> RunInfo:
    """Locate a run's checkpoint, config, status and metrics. Missing extras are tolerated."""
    path = Path(path).expanduser()
    ckpt = resolve_checkpoint(path, which)
    if (path / rd.CHECKPOINTS).is_dir():
        root = path
    elif ckpt.parent.name == rd.CHECKPOINTS:
        root = ckpt.parent.parent
    else:
        root = ckpt
    config: dict[str, Any] = {}
    if root != ckpt and (root / RUN_CONFIG).is_file():
        config = _read_json(root / RUN_CONFIG, what="run config")
    status = _read_json(root / STATUS, what="run status") if (root / STATUS).is_file() else None
    metrics = next((d / METRICS for d in (root, ckpt) if (d / METRICS).is_file()), None)
    return RunInfo(path=root, checkpoint=ckpt, config=config, status=status, metrics_path=metrics)


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """All JSON objects of a metrics.jsonl, and the number of unreadable lines skipped
    (a run killed mid-write can leave a torn last line)."""
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict):
                records.append(obj)
            else:
                bad += 1
    return records, bad


def entropy_history(records: list[dict[str, Any]], n_layer: int | None = None) -> EntropyHistory | None:
    """Per-layer mean entropy over steps from metrics records that carry a per-head entropy
    (``L x H`` lists; an ``L`` list is taken as per-layer means already). None when none do."""
    steps, rows = [], []
    for r in records:
        step = next((r[k] for k in _STEP_KEYS if isinstance(r.get(k), (int, float))), None)
        val = next((r[k] for k in _ENTROPY_KEYS if isinstance(r.get(k), list)), None)
        if step is None or val is None:
            continue
        try:
            a = np.array(val, dtype=np.float64)  # None (non-finite, as JSON null) -> nan
        except (TypeError, ValueError):
            continue
        if a.ndim == 2:
            with np.errstate(all="ignore"):
                a = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in a])
        if a.ndim != 1 or (n_layer is not None and a.shape[0] != n_layer):
            continue
        steps.append(int(step))
        rows.append(a)
    if not rows:
        return None
    # A resumed run may log a step twice: keep the last record of each step, in step order.
    last = {s: i for i, s in enumerate(steps)}
    order = sorted(last)
    return EntropyHistory(steps=order, layer_mean=np.stack([rows[last[s]] for s in order]))


def analyse_run(
    path: str | Path,
    data_dir: str | Path | None = None,
    *,
    batches: int | None = 8,
    batch_size: int = 8,
    seq_len: int | None = None,
    which: str = "best",
    name: str | None = None,
    device: str = "cpu",
    progress: bool = False,
    **diagnosis_options: Any,
) -> EntropyResult:
    """Measure and diagnose a piformer run (or checkpoint) on its validation data.

    data_dir: defaults to the data directory recorded in RUN_DIR/config.json.
    seq_len: defaults to the model's block_size (the context it was trained at).
    diagnosis_options: reference, overload_frac, collapse_frac, layer_share (see analyse_entropy).
    """
    info = open_run(path, which)
    data = Path(data_dir).expanduser() if data_dir is not None else info.recorded_data_dir()
    if data is None:
        raise ValueError(
            f"{info.path}: no data directory given and none recorded in {info.path / RUN_CONFIG}; "
            "pass --data DIR (a prepared directory with val.bin and meta.json)"
        )
    if not data.is_dir():
        how = "given" if data_dir is not None else f"recorded in {info.path / RUN_CONFIG}"
        raise FileNotFoundError(f"data directory {data} ({how}) does not exist; pass --data DIR")
    model = load_model(info.checkpoint, device=device)
    cfg = model.config
    T = cfg.block_size if seq_len is None else int(seq_len)
    if not 2 <= T <= cfg.block_size:
        raise ValueError(f"seq_len={T} is outside [2, block_size={cfg.block_size}] for {info.checkpoint}")
    entropy, n_seq = measure_head_entropy(
        model, val_batches(data, T, batch_size, batches, vocab_size=cfg.vocab_size), device=device,
        progress=progress,
    )
    notes: list[str] = []
    history = None
    if info.metrics_path is not None:
        records, bad = read_metrics(info.metrics_path)
        if bad:
            notes.append(f"{info.metrics_path}: skipped {bad} unreadable line(s)")
        history = entropy_history(records, cfg.n_layer)
    thresholds = model.thresholds()
    temps = model.temperatures()
    if T != cfg.block_size and cfg.entropy_reg:
        notes.append(f"measured at T={T}, but the regulariser's targets are theta * log {cfg.block_size}")
    return analyse_entropy(
        entropy, T,
        name=name or info.preset or info.path.name,
        source=str(info.path), kind="piformer", preset=info.preset, checkpoint=str(info.checkpoint),
        data=str(data), n_sequences=n_seq, notes=notes,
        thresholds=None if thresholds is None else thresholds.detach().double().cpu().numpy(),
        temperature=None if temps is None else temperature_stats(temps),
        history=history, status=info.status,
        **diagnosis_options,
    )


def analyse_hf(
    path: str | Path,
    data_dir: str | Path | None = None,
    *,
    text: str | Path | None = None,
    batches: int | None = 8,
    batch_size: int = 8,
    seq_len: int | None = None,
    name: str | None = None,
    device: str = "cpu",
    progress: bool = False,
    **diagnosis_options: Any,
) -> EntropyResult:
    """Measure and diagnose a HF causal LM directory on token ids (`data_dir`) or a text file
    tokenized with the model's own tokenizer (`text`)."""
    path = Path(path).expanduser()
    if (data_dir is None) == (text is None):
        raise ValueError(
            f"{path} is a HF model directory: give exactly one of --data DIR (token ids in the model's "
            "vocabulary) or --text FILE (tokenized with the tokenizer saved in the model directory)"
        )
    model = load_hf_causal_lm(path, device=device)
    ctx = hf_context_length(model)
    T = int(seq_len) if seq_len is not None else min(HF_DEFAULT_SEQ_LEN, ctx or HF_DEFAULT_SEQ_LEN)
    if T < 2 or (ctx is not None and T > ctx):
        raise ValueError(f"seq_len={T} is outside [2, {ctx}] for {path}")
    if text is not None:
        batch_iter = hf_tokenize_text(text, path, T, batch_size, batches)
        source_data = str(text)
    else:
        data = Path(data_dir).expanduser()
        batch_iter = val_batches(data, T, batch_size, batches, vocab_size=model.config.vocab_size)
        source_data = str(data)
    entropy, n_seq = measure_head_entropy(hf_entropy_fn(model), batch_iter, device=device, progress=progress)
    return analyse_entropy(
        entropy, T, name=name or path.name, source=str(path), kind="hf",
        preset=getattr(model.config, "model_type", None), data=source_data, n_sequences=n_seq,
        window=hf_sliding_window(model.config), **diagnosis_options,
    )


def analyse_paths(
    paths: list[str | Path],
    data_dir: str | Path | None = None,
    *,
    names: list[str] | None = None,
    text: str | Path | None = None,
    errors: list[tuple[str, str]] | None = None,
    **options: Any,
) -> list[EntropyResult]:
    """Analyse several runs / checkpoints / HF model directories; labels are made unique.

    options: batches, batch_size, seq_len, which (piformer only), device, progress, and the
    diagnosis options of `analyse_entropy`.
    errors: when a list is given, a path that cannot be analysed (no checkpoint, e.g. a run that
    diverged before its first one; bad data) is skipped and ``(path, message)`` appended to it,
    instead of stopping the whole comparison.
    """
    if names is not None and len(names) != len(paths):
        raise ValueError(f"{len(names)} names given for {len(paths)} runs")
    which = options.pop("which", "best")
    results = []
    for i, p in enumerate(paths):
        try:
            if is_hf_model_dir(p):
                r = analyse_hf(p, data_dir, text=text, **options)
            else:
                if text is not None:
                    raise ValueError("--text applies to HF model directories only; piformer runs read --data")
                r = analyse_run(p, data_dir, which=which, **options)
        except (ValueError, FileNotFoundError) as err:
            if errors is None:
                raise
            errors.append((str(p), str(err)))
            continue
        if names is not None:
            r.name = names[i]
        results.append(r)
    if names is None:
        _uniquify(results)
    return results


RESULT_FILE = rd.ENTROPY
"""Where a pipeline (e.g. `piformer reproduce`) keeps a run's analysis: RUN_DIR/entropy.json."""


def save_result(result: EntropyResult, path: str | Path) -> Path:
    """Write ``result.to_dict()`` as JSON (atomically); a directory gets ``entropy.json`` inside."""
    from ..fileio import atomic_write_text

    p = Path(path)
    if p.is_dir():
        p = p / RESULT_FILE
    atomic_write_text(p, json.dumps(result.to_dict(), indent=1) + "\n")
    return p


def load_result(path: str | Path) -> EntropyResult:
    """Read a saved result: a JSON file, or a directory holding ``entropy.json``."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULT_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no saved entropy analysis at {p}")
    return EntropyResult.from_dict(_read_json(p, what="entropy analysis"))


def load_results(path: str | Path) -> list[EntropyResult]:
    """Results saved by `save_result` (one) or by ``piformer entropy --out`` (``{"runs": [...]}``)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULT_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no saved entropy analysis at {p}")
    d = _read_json(p, what="entropy analysis")
    return [EntropyResult.from_dict(x) for x in d["runs"]] if "runs" in d else [EntropyResult.from_dict(d)]


def load_or_analyse(items: list, **options: Any) -> list[EntropyResult]:
    """Results for a mix of `EntropyResult`s and paths: a path's saved ``entropy.json`` when it
    has one, else a fresh analysis (`analyse_paths` options apply). Labels are made unique."""
    out: list[EntropyResult] = []
    for x in items:
        if isinstance(x, EntropyResult):
            out.append(x)
        elif (Path(x) / RESULT_FILE).is_file() or (Path(x).is_file() and Path(x).suffix == ".json"):
            out.extend(load_results(x))
        else:
            out.extend(analyse_paths([x], **options))
    _uniquify(out)
    return out


# American spellings, for callers who expect them.
analyze_run = analyse_run
analyze_hf = analyse_hf
analyze_paths = analyse_paths


# ---------------------------------------------------------------------------------------


def _uniquify(results: list[EntropyResult]) -> None:
    """Preset names label runs unless two runs share one; then directory names (then paths)."""
    names = [r.name for r in results]
    if len(set(names)) == len(names):
        return
    seen: dict[str, int] = {}
    for r in results:
        if names.count(r.name) > 1:
            p = Path(r.source)
            label = p.name if r.preset is None else f"{r.preset} ({p.name})"
            r.name = label
    names = [r.name for r in results]
    for r in results:
        if names.count(r.name) > 1:
            k = seen[r.name] = seen.get(r.name, 0) + 1
            r.name = f"{r.name} #{k}"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} ({what}) is not valid JSON: {err}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} ({what}) must hold a JSON object")
    return d
