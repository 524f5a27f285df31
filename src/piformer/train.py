"""The training loop: one process, or many under torchrun (DDP). nanoGPT-shaped, on purpose.

    result = train(ModelConfig.from_preset("SM+LN+G", "tiny"), train_recipe("tiny"), "data/builtin", "runs/x")

A run directory holds (piformer.run_dir owns the layout, the names and the lock):

    config.json          preset, size, model and train configs, data dir and its fingerprint
    status.json          {status: running|finished|diverged|interrupted, step, best_val_loss, ...}
    metrics.jsonl        one line per step (loss, ce, reg, lr, grad_norm, tokens_per_s); every
                         log_interval also head_entropy (L x H), thresholds (L x H), temperature
                         stats per layer; eval lines {"event": "eval", val_loss, val_ppl}
    checkpoints/last/    model.safetensors, config.json, trainer_state.pt (atomic, see checkpoint.py)
    checkpoints/best/    the same, for the lowest validation loss so far
    .lock, .lock.holder  held by the train() writing the run (rank 0); its pid, host and start

Determinism: the batch of micro-step m at step s on rank r is a pure function of
(seed, s, r * accum + m), and dropout is reseeded from the same numbers, so resuming from a
checkpoint at step s replays exactly what an uninterrupted run would do, and the global batch
does not depend on how it is split over processes. The learning rate is a pure function of
the step too, so the only state to restore is the weights and the optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from . import run_dir as rd
from .config import ModelConfig, TrainConfig
from .data.shards import TokenData
from .errors import RunTerminated
from .logging_sinks import JSONLSink, TensorBoardSink, dispatch, notify, require_tensorboard
from .logging_sinks import jsonable as _jsonable
from .logging_sinks import scalars as _scalars  # noqa: F401  (tests read the TensorBoard scalars through it)
from .model import PiGPT

EXIT_DIVERGED = 3
"""CLI exit status of a run that stopped on a non-finite loss (a result, not a crash)."""


def _ended_by(err: BaseException) -> dict[str, Any]:
    """The status fields of a run that stopped on `err`."""
    if isinstance(err, RunTerminated):
        return {"status": "terminated"}
    if isinstance(err, KeyboardInterrupt):
        return {"status": "interrupted"}
    return {"status": "failed", "error": f"{type(err).__name__}: {err}"}


@contextlib.contextmanager
def _sigterm_stops_the_run():
    """Turn SIGTERM into RunTerminated while training (main thread only: signal handlers live there)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise RunTerminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

_clock = time.perf_counter
"""Clock for per-step timing (tokens_per_s). The throughput benchmark swaps in process CPU time
to measure on a machine shared with other work."""


# ---------------------------------------------------------------------------------------
# Schedule


def warmup_steps(cfg: TrainConfig) -> int:
    """`warmup` < 1 is a fraction of max_steps, otherwise a number of steps."""
    return int(round(cfg.warmup * cfg.max_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update with 0-based index `step`: linear warmup, then linear or cosine decay."""
    w = warmup_steps(cfg)
    if step < w:
        return cfg.lr * (step + 1) / w
    if cfg.max_steps <= w:
        return cfg.lr
    progress = min(1.0, (step - w) / max(1, cfg.max_steps - w))
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    return cfg.min_lr + (1.0 - progress) * (cfg.lr - cfg.min_lr)


# ---------------------------------------------------------------------------------------
# Environment: device, precision, processes


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    created: bool = False
    """Whether train() initialised the process group (and so should destroy it)."""

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def _setup_dist(device_type: str) -> _Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python` run has none of them."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    d = _Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        d.created = True
    return d


def _resolve_device(cfg: TrainConfig, d: _Dist) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device='cuda' but no CUDA device is available; use device=auto or cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. 'auto' is bf16 on CUDA (the paper's GPUs) and fp32 on CPU."""
    name = cfg.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("TrainConfig.dtype='fp16' needs CUDA; on CPU use 'bf16' or 'fp32'")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (numpy's SeedSequence mixes well and is stable across versions)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def _reseed(device: torch.device, seed: int) -> None:
    # The default generators directly: torch.manual_seed also queues seeds for every lazily
    # initialised backend (cuda, xpu, mtia), formatting a stack trace each time (~1 ms a call).
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


def _fingerprint(data: TokenData) -> dict[str, Any]:
    s = data.meta["splits"]
    tok = data.dir / "tokenizer.json"
    import hashlib

    return {
        "train_sha256": s["train"].get("sha256"), "val_sha256": s["val"].get("sha256"),
        "tokenizer_sha256": hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None,
    }


# ---------------------------------------------------------------------------------------
# Run directory files


class _Run:
    """RUN_DIR bookkeeping: config.json, status.json, metrics.jsonl, TensorBoard (rank 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool, callbacks: Sequence[Any] = ()):
        self.dir = out_dir
        self.enabled = enabled
        self.status: dict[str, Any] = {}
        self.ended = False
        """Whether status.json already records how this attempt stopped."""
        self._metrics: JSONLSink | None = None
        self._listeners: list[Any] = []
        self._callbacks = list(callbacks)

    def open_metrics(self, keep_through_step: int | None, tensorboard: bool) -> None:
        """metrics.jsonl (resuming at step s: cut back to s), TensorBoard if asked, then the
        user's callbacks, which each log record reaches in that order (piformer.logging_sinks)."""
        if not self.enabled:
            return
        self._metrics = JSONLSink(self.dir / rd.METRICS, keep_through_step)
        self._listeners = [self._metrics, *([TensorBoardSink(self.dir / rd.TENSORBOARD)] if tensorboard else []),
                           *self._callbacks]
        for listener in self._listeners:
            notify(listener, "on_train_start", self.dir)

    def log(self, record: dict[str, Any], flush: bool = False) -> None:
        if not self.enabled:
            return
        for listener in self._listeners:
            dispatch(listener, record)
        if flush:
            self._metrics.flush()

    def checkpoint(self, step: int, which: str, path: Path) -> None:
        for listener in self._listeners if self.enabled else ():
            notify(listener, "on_checkpoint", step, which, path)

    def set_status(self, **fields: Any) -> None:
        if not self.enabled:
            return
        self.status.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rd.write_status(self.dir, _jsonable(self.status))

    def end(self, err: BaseException, **fields: Any) -> None:
        self.set_status(**_ended_by(err), **fields)
        self.ended = True

    def flush(self) -> None:
        if self._metrics is not None:
            self._metrics.flush()

    def close(self) -> None:
        for listener in self._listeners:
            notify(listener, "close")
        self._listeners = []


def _model_stats(model: PiGPT) -> dict[str, Any]:
    """Learned thresholds (L x H, and mean/std per layer) and per-layer temperature statistics
    (mean, std, min, max, share <= 0), when the model has them."""
    out: dict[str, Any] = {}
    with torch.no_grad():
        th = model.thresholds()
        if th is not None:
            th = th.float()
            out["thresholds"] = th.cpu().tolist()
            out["threshold_stats"] = {"mean": th.mean(1).tolist(), "std": th.std(1).tolist()}
        t = model.temperatures()
        if t is not None:
            flat = t.float().flatten(1)  # (L, H*T)
            out["temperature"] = {
                "mean": flat.mean(1).tolist(), "std": flat.std(1).tolist(),
                "min": flat.min(1).values.tolist(), "max": flat.max(1).values.tolist(),
                "frac_nonpos": (flat <= 0).float().mean(1).tolist(),
            }
    return out


def _pattern_params(model: PiGPT) -> list[torch.Tensor]:
    """The parameters that shape attention patterns: query/key projections and temperatures."""
    return [p for n, p in model.named_parameters()
            if p.requires_grad and (".attn.q_proj." in n or ".attn.k_proj." in n or "temperature" in n)]


def reg_grad_ratio(model: PiGPT, x: torch.Tensor, y: torch.Tensor, reg, amp_dtype=None) -> dict[str, float]:
    """||grad(lambda * penalty)|| / ||grad CE|| over the attention-pattern parameters (query and
    key projections, temperatures) on one batch: how hard the regulariser pulls next to the
    language-modelling loss. Leaves the model's .grad untouched."""
    params = _pattern_params(model)
    with _autocast(x.device, amp_dtype):
        o = model(x, y, reg=reg)
    g_ce = torch.autograd.grad(o.ce_loss, params, retain_graph=True, allow_unused=True)
    g_reg = torch.autograd.grad(reg.lam * o.reg_loss, params, allow_unused=True)
    norm = lambda gs: math.sqrt(sum(float(g.float().square().sum()) for g in gs if g is not None))  # noqa: E731
    n_ce, n_reg = norm(g_ce), norm(g_reg)
    return {"reg_grad_norm": n_reg, "ce_grad_norm": n_ce, "reg_grad_ratio": n_reg / n_ce if n_ce > 0 else float("nan")}


# ---------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: PiGPT,
    data: TokenData,
    batch_size: int,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Mean validation cross-entropy over fixed windows, and perplexity = exp(mean CE).

    Every window has block_size tokens, so the mean over windows is the mean over tokens.
    Under DDP each rank scores its share of the windows and the sums are all-reduced.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    T = model.config.block_size
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of CE over tokens, tokens)
    for x, y in data.iter_val(batch_size, T, max_batches, rank, world_size, device):
        with _autocast(device, amp_dtype):
            # CE from the logits rather than model(x, y): without targets the model keeps the
            # fused attention path even when it is entropy-regularised (same numbers, faster).
            logits = model(x).logits
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        total += torch.stack([ce.double() * y.numel(), torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    loss = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf"),
            "val_tokens": int(total[1].item())}


def evaluate_run(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Score a run's checkpoint on its data's val split: moved to `piformer.evaluate.evaluate_run`
    (which also scores HF models and text files); this name stays for existing imports."""
    from .evaluate import evaluate_run as _evaluate_run

    return _evaluate_run(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Training


def _model_diff(a: ModelConfig, b: ModelConfig) -> list[tuple[str, Any, Any]]:
    """(field, a's value, b's value) for every ModelConfig field where the two differ."""
    return [(f.name, getattr(a, f.name), getattr(b, f.name))
            for f in dataclasses.fields(ModelConfig) if getattr(a, f.name) != getattr(b, f.name)]


def _check_resume_compatible(saved: dict[str, Any], model_cfg: ModelConfig, fingerprint: dict[str, Any]) -> None:
    saved_model = ModelConfig.from_saved(saved["model"])
    if saved_model != model_cfg:
        diff = [f"{k}: {a!r} -> {b!r}" for k, a, b in _model_diff(saved_model, model_cfg)]
        raise ValueError("--resume with a different model config than the run's: " + "; ".join(diff))
    old = saved.get("data", {}).get("fingerprint", {})
    changed = [k for k in ("train_sha256", "tokenizer_sha256") if old.get(k) and old[k] != fingerprint.get(k)]
    if changed:
        raise ValueError(f"--resume with different data than the run was trained on ({', '.join(changed)} changed)")


def _check_checkpoint_matches(ckpt: Path, model_cfg: ModelConfig, out: Path) -> None:
    """The checkpoint a resume loads must hold the run's model: load_model builds whatever its
    config.json describes, so a stray or copied checkpoint would silently train another model."""
    ckpt_cfg = ckpt_io.load_config(ckpt)
    if ckpt_cfg != model_cfg:
        diff = [f"{k}: {a!r} in the checkpoint, {b!r} in the run" for k, a, b in _model_diff(ckpt_cfg, model_cfg)]
        raise ValueError(f"--resume: {ckpt / ckpt_io.CONFIG} describes a different model than {out / rd.CONFIG} "
                         f"({'; '.join(diff)}); the checkpoint does not belong to this run")


def _best_so_far(state: dict[str, Any], best_dir: Path) -> tuple[float, int | None]:
    """(best_val_loss, best_step) to resume with: `last`'s record, or the best checkpoint's when lower.

    An evaluation between two `last` checkpoints (or a kill between the best and the last save)
    can leave a best newer than `last` knows; forgetting it would let the resumed run overwrite
    that checkpoint with a worse model.
    """
    best_val, best_step = float(state.get("best_val_loss", float("inf"))), state.get("best_step")
    try:
        best = ckpt_io.load_trainer_state(best_dir, mmap=True)
    except (FileNotFoundError, ValueError):  # no best yet, or an unreadable one: nothing to keep
        return best_val, best_step
    if best and best.get("best_val_loss") is not None and float(best["best_val_loss"]) < best_val:
        return float(best["best_val_loss"]), best.get("best_step")
    return best_val, best_step


LOCK_FILE, LOCK_HOLDER = rd.LOCK_FILE, rd.LOCK_HOLDER  # where they were first defined; piformer.run_dir owns them
_lock_run_dir, _unlock_run_dir = rd.lock, rd.unlock
_read_status = rd.read_status


_has_checkpoint = rd.has_checkpoint


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    *,
    preset: str | None = None,
    size: str | None = None,
    progress: bool | str = True,
    init_from: str | Path | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train `model_cfg` on the prepared data in `data_dir`, writing the run to `out_dir`.

    callbacks: objects with any of on_train_start / on_log / on_eval / on_checkpoint / close
    (piformer.logging_sinks: e.g. a WandbSink, or your own), called on rank 0 with every record.

    init_from: a Hugging Face GPT-2 checkpoint (a directory, or a hub name in the local cache) whose
    tensors start the new model where shapes allow (piformer.hf.init; ignored when resuming).

    progress: True, a progress bar; "lines", a printed line per evaluation (for runs side by side);
    False, nothing.

    The model's vocab_size is taken from the data. Returns a dict with status ('finished' or
    'diverged'), step, best_val_loss, final val_loss/val_ppl, tokens_per_s and paths.
    Raises ValueError / FileNotFoundError for bad input before doing any work, and RunInUseError
    when another process is training into `out_dir` (rank 0 holds RUN_DIR/.lock throughout).
    However it stops, status.json says how: finished, diverged, interrupted (Ctrl-C),
    terminated (SIGTERM, raised here as RunTerminated) or failed (with the error).
    """
    if train_cfg.tensorboard:
        require_tensorboard()  # a missing package fails here, before the run directory is touched
    # The lock is released last, after the status has recorded how the run ended.
    with contextlib.ExitStack() as held, _sigterm_stops_the_run():
        return _train(held, model_cfg, train_cfg, data_dir, out_dir, resume, preset, size, progress, init_from,
                      callbacks)


# -- set-up ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Env:
    """Where and how this process trains, fixed by set-up: data, processes, device, batch split."""

    data: TokenData
    model_cfg: ModelConfig
    """The requested model with the data's vocab_size."""
    fingerprint: dict[str, Any]
    d: _Dist
    device: torch.device
    amp_dtype: torch.dtype | None
    micro: int
    """Micro-batch size: sequences per forward pass on this process."""
    accum: int
    """Micro-batches per update on this process (gradient accumulation)."""

    @property
    def tokens_per_step(self) -> int:
        return self.micro * self.accum * self.d.world * self.model_cfg.block_size


def _environment(model_cfg: ModelConfig, train_cfg: TrainConfig, data_dir: str | Path) -> _Env:
    """Open the data, join the process group (under torchrun), pick device and precision, split the batch."""
    data = TokenData(data_dir)
    if model_cfg.vocab_size != data.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=data.vocab_size)
    data.check_block_size(model_cfg.block_size)
    fingerprint = _fingerprint(data)

    device_type = "cuda" if train_cfg.device == "cuda" or (train_cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    d = _setup_dist(device_type)
    device = _resolve_device(train_cfg, d)
    amp_dtype = _autocast_dtype(train_cfg, device)

    micro = min(train_cfg.micro_batch_size, max(1, train_cfg.batch_size // d.world))
    if train_cfg.batch_size % (micro * d.world):
        raise ValueError(
            f"TrainConfig.batch_size={train_cfg.batch_size} must be a multiple of micro_batch_size x processes "
            f"= {micro} x {d.world}; adjust train.batch_size or train.micro_batch_size"
        )
    accum = train_cfg.batch_size // (micro * d.world)
    return _Env(data, model_cfg, fingerprint, d, device, amp_dtype, micro, accum)


def _open_run_dir(held: contextlib.ExitStack, out: Path, resume: bool, env: _Env,
                  callbacks: Sequence[Any]) -> tuple[_Run, Path | None, dict[str, Any] | None]:
    """Take the run directory (rank 0 locks it until train() returns), check a resume against it or
    start a checkpoint-less run over, and arrange that however the run stops, status.json says how.

    Returns the run's bookkeeping and the `last` checkpoint to resume from with its trainer state
    (None, None: start at step 0)."""
    last: Path | None = None
    state: dict[str, Any] | None = None
    if resume and not rd.has_config(out):
        raise FileNotFoundError(f"--resume: {out} holds no run (no config.json); start it without --resume")
    if env.d.master:  # before reading the run: it must not change under us (other ranks only read)
        lock = _lock_run_dir(out)
        held.callback(_unlock_run_dir, out, lock)
    if resume:
        saved = rd.read_config(out)
        _check_resume_compatible(saved, env.model_cfg, env.fingerprint)
        try:
            last = ckpt_io.resolve_checkpoint(rd.checkpoint_dir(out, rd.LAST))
        except FileNotFoundError:
            last = None  # killed before the first checkpoint: start over in place
        if last is not None:
            _check_checkpoint_matches(last, env.model_cfg, out)
            state = ckpt_io.load_trainer_state(last)
    elif rd.has_config(out) or (out / rd.CHECKPOINTS).exists():
        _start_over(out, env.d)
    if env.d.on:
        # Every rank has now read the run directory as it was; only then may rank 0 write to it
        # (otherwise a slower rank would find rank 0's fresh config.json and refuse to start).
        dist.barrier()

    run = _Run(out, enabled=env.d.master, callbacks=callbacks)

    def record_how_it_ended(exc_type, exc, tb) -> bool:
        if exc is not None and not run.ended:
            run.status = run.status or _read_status(out)
            run.end(exc)
        return False  # the exception goes on

    held.push(record_how_it_ended)  # runs before the lock is released
    if env.d.master:
        # A kill mid-save leaves the half-written temp directory of checkpoint.save_checkpoint
        # behind (never mistaken for a checkpoint, but litter). We hold the lock, so no other
        # process is saving here: every temporary is stale. Clear them before writing again.
        ckpts = out / rd.CHECKPOINTS
        for stale in ckpts.glob(".*.tmp-*") if ckpts.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)
    return run, last, state


def _start_over(out: Path, d: _Dist) -> None:
    """A run directory that is not resumed: refuse one with a checkpoint; start over one without."""
    if _has_checkpoint(out):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose a new --out")
    # A run that stopped before its first checkpoint (a failed start, a kill) has nothing to
    # resume: a corrected retry starts it over. Its log is kept aside, not deleted.
    if d.master:
        prior = _read_status(out).get("status", "unknown")
        if (out / rd.METRICS).is_file():
            os.replace(out / rd.METRICS, out / rd.METRICS_PREVIOUS)
        print(f"{out}: starting over; the run there ended '{prior}' before its first checkpoint "
              f"(its metrics are kept in {rd.METRICS_PREVIOUS})", file=sys.stderr)


def _write_run_config(out: Path, env: _Env, train_cfg: TrainConfig, data_dir: str | Path,
                      preset: str | None, size: str | None) -> None:
    """RUN_DIR/config.json: what was trained, on what, where (rank 0)."""
    if not env.d.master:
        return
    run_cfg = {
        "preset": preset, "size": size, "model": env.model_cfg.to_dict(), "train": train_cfg.to_dict(),
        "data": {"dir": str(Path(data_dir).resolve()), "source": env.data.meta.get("source"),
                 "vocab_size": env.data.vocab_size, "fingerprint": env.fingerprint},
        "world_size": env.d.world, "device": str(env.device), "micro_batch_size": env.micro, "grad_accum": env.accum,
        "torch": torch.__version__, "python": sys.version.split()[0],
    }
    rd.write_config(out, run_cfg)


def _build_model(env: _Env, train_cfg: TrainConfig, out: Path, last: Path | None, state: dict[str, Any] | None,
                 init_from: str | Path | None):
    """(model to step, bare model, optimizer, scaler): new, or restored from `last` and its trainer
    state. The model to step is the bare one, compiled and/or DDP-wrapped as configured."""
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    if state is not None:
        model = ckpt_io.load_model(last, device=env.device).train()
    else:
        model = PiGPT(env.model_cfg).to(env.device)
        if init_from is not None:  # weights from a Hugging Face checkpoint where shapes allow
            from .hf.init import init_from_pretrained

            init_from_pretrained(model, init_from).announce(out if env.d.master else None)
    raw_model = model
    optimizer = torch.optim.AdamW(
        model.optim_groups(train_cfg.weight_decay), lr=train_cfg.lr,
        betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
        **({"fused": True} if env.device.type == "cuda" else {}),
    )
    scaler = torch.amp.GradScaler("cuda", enabled=env.amp_dtype == torch.float16)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng(state.get("rng"))
    if train_cfg.compile:
        model = torch.compile(model)
    if env.d.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[env.d.local_rank] if env.device.type == "cuda" else None)
    return model, raw_model, optimizer, scaler


@dataclasses.dataclass
class _Trainer:
    """One train() call after set-up: its fixed parts, and the counters the loop moves."""

    env: _Env
    cfg: TrainConfig
    out: Path
    run: _Run
    model: torch.nn.Module
    """What a step calls: the bare model, or its compiled / DDP wrapper."""
    raw_model: PiGPT
    """The bare model: evaluated, measured and saved."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    reg: Any
    """The entropy regulariser's loss settings (used when the model is entropy-regularised)."""
    step: int = 0
    """Updates done: the next update has 0-based index `step`."""
    best_val: float = float("inf")
    best_step: int | None = None
    last_ckpt_step: int | None = None


def _set_up(held: contextlib.ExitStack, model_cfg: ModelConfig, train_cfg: TrainConfig, data_dir: str | Path,
            out: Path, resume: bool, preset: str | None, size: str | None, init_from: str | Path | None,
            callbacks: Sequence[Any]) -> _Trainer:
    """Everything before the first step: environment, run directory, model, optimizer, resume
    point, logging (metrics.jsonl cut back to the resume step), status 'running'."""
    env = _environment(model_cfg, train_cfg, data_dir)
    run, last, state = _open_run_dir(held, out, resume, env, callbacks)
    _write_run_config(out, env, train_cfg, data_dir, preset, size)
    model, raw_model, optimizer, scaler = _build_model(env, train_cfg, out, last, state, init_from)
    t = _Trainer(env, train_cfg, out, run, model, raw_model, optimizer, scaler, train_cfg.reg_loss())
    if state is not None:
        t.step = t.last_ckpt_step = int(state["step"])
        t.best_val, t.best_step = _best_so_far(state, rd.checkpoint_dir(out, rd.BEST))

    run.open_metrics(t.step if resume else None, train_cfg.tensorboard)
    if resume and env.d.master:
        run.status = _read_status(out)
        run.log({"step": t.step, "event": "resume", "world_size": env.d.world}, flush=True)
    run.set_status(status="running", step=t.step, max_steps=train_cfg.max_steps, best_val_loss=t.best_val,
                   best_step=t.best_step, diverged_at=None, error=None, pid=os.getpid())
    return t


# -- one step ----------------------------------------------------------------------------


@dataclasses.dataclass
class _StepOut:
    """What one update measured: means over the global batch, and this rank's last micro-batch."""

    lr: float
    loss: float
    ce: float
    reg: float
    outside: float
    grad_norm: float
    head_entropy: torch.Tensor | None
    """(L, H) mean over this rank's micro-batches, when asked for and the forward computed it."""
    x: torch.Tensor
    y: torch.Tensor
    diverged: bool = False


def _accumulate_gradients(t: _Trainer, want_entropy: bool):
    """Forward and backward over this rank's micro-batches of update `t.step`, gradients summed
    (DDP: all-reduced on the last). Returns (loss, ce, reg, reg_outside) averaged over all ranks,
    head entropy (or None), and the last micro-batch (x, y)."""
    env, cfg, step = t.env, t.cfg, t.step
    T = env.model_cfg.block_size
    sums = torch.zeros(4, device=env.device)  # loss, ce, reg, reg_outside: means over this rank's micro-batches
    head_ent = None
    for m in range(env.accum):
        g = env.d.rank * env.accum + m  # global micro-batch index: batches do not depend on world size
        if env.model_cfg.dropout > 0:  # dropout masks as a function of the step: reproducible on resume
            _reseed(env.device, _mix_seed(cfg.seed, step, g))
        x, y = env.data.get_batch("train", env.micro, T, step=step, micro_step=g, seed=cfg.seed, device=env.device)
        sync = not env.d.on or m == env.accum - 1  # DDP all-reduces gradients on the last micro-step only
        with (contextlib.nullcontext() if sync else t.model.no_sync()), _autocast(env.device, env.amp_dtype):
            o = t.model(x, y, reg=t.reg)
            loss = o.loss / env.accum
        t.scaler.scale(loss).backward()
        reg_term = o.reg_loss.detach() if o.reg_loss is not None else torch.zeros((), device=env.device)
        outside = o.reg_outside if o.reg_outside is not None else torch.zeros((), device=env.device)
        sums += torch.stack([o.loss.detach(), o.ce_loss.detach(), reg_term.float(), outside]) / env.accum
        if want_entropy and o.head_entropy is not None:
            e = o.head_entropy.detach() / env.accum
            head_ent = e if head_ent is None else head_ent + e
    if env.d.on:
        dist.all_reduce(sums)  # gloo has no AVG: sum, then divide
        sums /= env.d.world
    return sums.tolist(), head_ent, x, y  # one host sync per step: needed to catch divergence now


def _train_step(t: _Trainer, want_entropy: bool) -> _StepOut:
    """Update `t.step`: set its learning rate, accumulate gradients, clip, and step the optimizer;
    unless the loss or the gradient is non-finite (checked before the update, so the weights stay
    good): then no update, and the result says diverged."""
    cfg, optimizer, scaler = t.cfg, t.optimizer, t.scaler
    lr = lr_at(t.step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    (loss_v, ce_v, reg_v, outside_v), head_ent, x, y = _accumulate_gradients(t, want_entropy)

    if cfg.grad_clip > 0 and math.isfinite(loss_v):
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(t.raw_model.parameters(), cfg.grad_clip).item()
    else:
        grad_norm = float("nan")
    out = _StepOut(lr, loss_v, ce_v, reg_v, outside_v, grad_norm, head_ent, x, y)
    # A finite loss with a non-finite gradient would write NaN into every weight; under fp16
    # the scaler skips such steps itself, otherwise the run has diverged here.
    bad_grad = cfg.grad_clip > 0 and not scaler.is_enabled() and not math.isfinite(grad_norm)
    if not math.isfinite(loss_v) or bad_grad:
        optimizer.zero_grad(set_to_none=True)
        out.diverged = True
        return out
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    t.step += 1
    return out


def _record_divergence(t: _Trainer, o: _StepOut) -> None:
    """A diverged run is a result: log it, record it in status.json (the last good checkpoint stays)."""
    at = t.step + 1
    t.run.log({"step": at, "event": "diverged", "loss": o.loss, "ce": o.ce, "lr": o.lr, "grad_norm": o.grad_norm,
               "cause": "gradient" if math.isfinite(o.loss) else "loss"}, flush=True)
    t.run.set_status(status="diverged", step=at, diverged_at=at, last_checkpoint_step=t.last_ckpt_step)


# -- log, evaluate, checkpoint -------------------------------------------------------------


def _step_record(t: _Trainer, o: _StepOut, seconds: float, full: bool) -> dict[str, Any]:
    """The metrics line of the update just done; `full` adds per-head entropy, thresholds and
    temperatures (every log_interval)."""
    regularised = t.env.model_cfg.entropy_reg
    tokens = t.env.tokens_per_step
    rec = {"step": t.step, "loss": o.loss, "ce": o.ce, "reg": o.reg if regularised else None,
           "lr": o.lr, "grad_norm": o.grad_norm, "tokens_per_s": tokens / max(seconds, 1e-9)}
    if regularised:
        # Is the regulariser doing anything? Its weighted share of the loss, and the share of
        # heads (query rows in 'query' mode) outside the tolerance band, where its gradient lives.
        rec["reg_weighted"] = t.reg.lam * o.reg
        rec["reg_share"] = t.reg.lam * o.reg / o.loss if o.loss else None
        rec["reg_outside"] = o.outside
        if t.env.d.master and t.cfg.reg_grad_interval and t.step % t.cfg.reg_grad_interval == 0:
            rec.update(reg_grad_ratio(t.raw_model, o.x, o.y, t.reg, t.env.amp_dtype))
    if full and t.env.d.master:
        head_ent = o.head_entropy
        if head_ent is None:  # the fused attention path computes no entropies: measure on this batch
            with torch.no_grad(), _autocast(t.env.device, t.env.amp_dtype):
                head_ent = t.raw_model(o.x, return_entropy=True).head_entropy
        rec["head_entropy"] = head_ent.float().cpu().tolist()
        rec.update(_model_stats(t.raw_model))
    return rec


def _save(t: _Trainer, which: str) -> None:
    """Write checkpoints/{which} at the current step (rank 0), after the metrics through it."""
    if t.env.d.master:
        # Every metrics line through `step` reaches the file first: a resume from this
        # checkpoint keeps those lines, so a kill just after it must not lose them.
        t.run.flush()
        path = rd.checkpoint_dir(t.out, which)
        ckpt_io.save_checkpoint(path, t.raw_model, _trainer_state(t))
        t.run.checkpoint(t.step, which, path)
    if which == rd.LAST:
        t.last_ckpt_step = t.step


def _trainer_state(t: _Trainer) -> dict[str, Any]:
    """What a checkpoint keeps beside the weights for an exact resume (and for the record)."""
    cfg, step = t.cfg, t.step
    return {
        "step": step, "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None,
        "scheduler": {"kind": cfg.schedule, "warmup_steps": warmup_steps(cfg), "lr": cfg.lr,
                      "min_lr": cfg.min_lr, "max_steps": cfg.max_steps, "note": "lr is a pure function of step"},
        "rng": _get_rng(), "best_val_loss": t.best_val, "best_step": t.best_step,
        "data_position": {"step": step, "seed": cfg.seed, "rule": "batch(seed, step, rank*accum+micro)"},
        "train_config": cfg.to_dict(), "world_size": t.env.d.world, "tokens_seen": step * t.env.tokens_per_step,
    }


def _evaluate(t: _Trainer, say: str | None) -> dict[str, float]:
    """Score the validation split, log it, keep a new best checkpoint, update status.json;
    `say`: a label to print the loss under (progress='lines'), or None."""
    env = t.env
    ev = evaluate(t.raw_model, env.data, env.micro, t.cfg.eval_batches, env.device, env.amp_dtype, env.d.rank, env.d.world)
    t.run.log({"step": t.step, "event": "eval", **ev}, flush=True)
    if ev["val_loss"] < t.best_val:
        t.best_val, t.best_step = ev["val_loss"], t.step
        _save(t, rd.BEST)
    t.run.set_status(step=t.step, best_val_loss=t.best_val, best_step=t.best_step, last_val_loss=ev["val_loss"])
    if say is not None and env.d.master:
        print(f"  {say}: step {t.step}/{t.cfg.max_steps}, val loss {ev['val_loss']:.4f}", flush=True)
    return ev


# -- the loop ------------------------------------------------------------------------------


def _train(held: contextlib.ExitStack, model_cfg: ModelConfig, train_cfg: TrainConfig, data_dir: str | Path,
           out_dir: str | Path, resume: bool, preset: str | None, size: str | None,
           progress: bool | str, init_from: str | Path | None = None,
           callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    t_start = time.time()
    out = Path(out_dir)
    t = _set_up(held, model_cfg, train_cfg, data_dir, out, resume, preset, size, init_from, callbacks)
    cfg, run = train_cfg, t.run
    bar = _progress_bar(t, preset) if progress is True else None
    say = (preset or out.name) if progress == "lines" else None

    t.model.train()
    status, diverged_at, last_eval = "finished", None, None
    t_loop, tokens_run = time.time(), 0
    try:
        while t.step < cfg.max_steps:
            t0 = _clock()
            log_now = (t.step + 1) % cfg.log_interval == 0 or t.step + 1 == cfg.max_steps
            o = _train_step(t, want_entropy=log_now)
            if o.diverged:
                status, diverged_at = "diverged", t.step + 1
                _record_divergence(t, o)
                break
            dt = _clock() - t0
            tokens_run += t.env.tokens_per_step
            rec = _step_record(t, o, dt, full=log_now)
            run.log(rec, flush=log_now)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{o.loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            if t.step % cfg.eval_interval == 0 or t.step == cfg.max_steps:
                last_eval = _evaluate(t, say)
            if t.step % cfg.checkpoint_interval == 0 or t.step == cfg.max_steps:
                _save(t, rd.LAST)
                run.set_status(step=t.step, last_checkpoint_step=t.step)
    except BaseException as err:
        run.end(err, step=t.step)
        raise
    finally:
        if bar is not None:
            bar.close()
        run.close()

    if status == "finished":
        run.set_status(status="finished", step=t.step)
    elapsed = time.time() - t_loop
    d = t.env.d
    if d.on:
        dist.barrier()
        if d.created:
            dist.destroy_process_group()
    return {
        "status": status, "step": t.step, "diverged_at": diverged_at, "max_steps": cfg.max_steps,
        "best_val_loss": t.best_val if math.isfinite(t.best_val) else None, "best_step": t.best_step,
        "last_checkpoint_step": t.last_ckpt_step,
        "val_loss": last_eval["val_loss"] if last_eval else None, "val_ppl": last_eval["val_ppl"] if last_eval else None,
        "tokens_per_s": tokens_run / elapsed if tokens_run else None, "seconds": time.time() - t_start,
        "run_dir": str(out), "world_size": d.world, "rank": d.rank,
    }


def _progress_bar(t: _Trainer, preset: str | None):
    """A tqdm bar over the steps, on rank 0 (None on the others)."""
    if not t.env.d.master:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.cfg.max_steps, initial=t.step, unit="step", dynamic_ncols=True,
                desc=f"train {preset or ''}".strip())


def _get_rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng(rng: dict[str, Any] | None) -> None:
    # Batches and dropout are reseeded from the step, so these only matter to code outside the loop.
    if not rng:
        return
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
