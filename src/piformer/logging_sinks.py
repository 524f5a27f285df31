"""Where training metrics go: metrics.jsonl, TensorBoard, Weights & Biases, or your own callback.

The trainer (rank 0 only) hands every record it logs to a list of listeners. A listener is any
object with some of these methods; the ones it lacks are skipped:

    on_train_start(run_dir)              the run directory exists and holds config.json
    on_log(step, metrics)                a training record (loss, lr, grad_norm, per-layer entropy,
                                         thresholds, temperatures, regulariser telemetry, ...), or
                                         an event ({"event": "resume" | "diverged", ...})
    on_eval(step, metrics)               a validation record (val_loss, val_ppl, val_tokens)
    on_checkpoint(step, which, path)     checkpoints/best or checkpoints/last was just written
    close()                              training stopped, however it stopped

`metrics` is the record as logged, with "step" in it; see `piformer.train` for the keys.

    class PrintLoss(Callback):
        def on_eval(self, step, metrics):
            print(step, metrics["val_loss"])

    train(model_cfg, train_cfg, "data/builtin", "runs/a", callbacks=[PrintLoss(), WandbSink("my-project")])

Optional loggers are imported when they are asked for, so a missing package is a one-line error
(`require`) before training writes anything into the run directory.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

from .fileio import atomic_write_text


class Callback:
    """A listener that does nothing: subclass it and override the hooks you need."""

    def on_train_start(self, run_dir: Path) -> None:
        pass

    def on_log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, step: int, which: str, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


def notify(listener: Any, hook: str, *args: Any) -> None:
    """Call `listener.hook(*args)` when the listener has that hook (duck typing: any object will do)."""
    fn = getattr(listener, hook, None)
    if fn is not None:
        fn(*args)


def dispatch(listener: Any, record: dict[str, Any]) -> None:
    """A logged record to its hook: validation records to on_eval, everything else to on_log."""
    notify(listener, "on_eval" if record.get("event") == "eval" else "on_log", record["step"], record)


def require(module: str, package: str | None = None, what: str | None = None):
    """Import an optional logger's module, or raise ValueError saying how to install it
    (the package alone, or as piformer's extra of the same name)."""
    package = package or module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what or package} needs the {package} package, which is not installed: "
                         f"pip install {package} (or pip install 'piformer[{package}]')") from None


def require_tensorboard():
    """torch's TensorBoard writer, or ValueError saying how to install tensorboard."""
    return require("torch.utils.tensorboard", "tensorboard", "TrainConfig.tensorboard=True").SummaryWriter


def jsonable(x: Any) -> Any:
    """Non-finite floats become null: metrics.jsonl stays strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(name, value) of a record's finite numbers, and of its per-layer statistics: threshold_stats
    and temperature ({stat: [per layer]}) as 'temperature/min/layer_3', and the per-head entropy
    (L x H) as its mean over heads, 'entropy/layer_3'."""
    for k, v in record.items():
        if k in ("step", "event") or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(v):
            yield k, v
        elif isinstance(v, dict) and k in ("threshold_stats", "temperature"):
            for stat, per_layer in v.items():
                for layer, x in enumerate(per_layer):
                    if isinstance(x, (int, float)) and math.isfinite(x):
                        yield f"{k}/{stat}/layer_{layer}", x
        elif k == "head_entropy" and isinstance(v, list):
            for layer, heads in enumerate(_per_layer(v)):
                if heads:
                    yield f"entropy/layer_{layer}", sum(heads) / len(heads)


def per_layer_values(record: dict[str, Any]) -> Iterator[tuple[str, list[float]]]:
    """(name, finite values over heads) per layer of the record's L x H tables, for histograms:
    'entropy/layer_3' from head_entropy, 'thresholds/layer_3' from thresholds."""
    for key, name in (("head_entropy", "entropy"), ("thresholds", "thresholds")):
        if isinstance(record.get(key), list):
            for layer, heads in enumerate(_per_layer(record[key])):
                if heads:
                    yield f"{name}/layer_{layer}", heads


def _per_layer(table: list) -> list[list[float]]:
    return [[x for x in (row if isinstance(row, list) else [row])
             if isinstance(x, (int, float)) and math.isfinite(x)] for row in table]


class JSONLSink(Callback):
    """RUN_DIR/metrics.jsonl: one JSON object per record, appended.

    keep_through_step: resuming at step s, the lines after s describe steps about to be redone
    and are dropped first (a torn last line from a kill goes too).
    """

    def __init__(self, path: str | Path, keep_through_step: int | None = None):
        self.path = Path(path)
        if keep_through_step is not None and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= keep_through_step:
                    kept.append(line)
            atomic_write_text(self.path, "".join(x + "\n" for x in kept))
        self._file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(jsonable(record)) + "\n")

    def on_log(self, step: int, metrics: dict[str, Any]) -> None:
        self.write(metrics)

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        self.write(metrics)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink(Callback):
    """RUN_DIR/tensorboard: every number as a scalar under train/ or val/, per-layer thresholds,
    temperatures and mean head entropy as scalars, and per-layer histograms over heads of the
    entropy and thresholds. Needs the tensorboard package (`pip install tensorboard`)."""

    def __init__(self, log_dir: str | Path):
        self.writer = require_tensorboard()(str(log_dir))

    def on_log(self, step: int, metrics: dict[str, Any]) -> None:
        self._write("train/", step, metrics)

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        self._write("val/", step, metrics)

    def _write(self, prefix: str, step: int, metrics: dict[str, Any]) -> None:
        for k, v in scalars(metrics):
            self.writer.add_scalar(prefix + k, v, step)
        for name, values in per_layer_values(metrics):
            self.writer.add_histogram(name, _array(values), step)

    def close(self) -> None:
        self.writer.close()


class WandbSink(Callback):
    """Weights & Biases: the same scalars as TensorBoard, logged to a W&B run whose files live in
    RUN_DIR/wandb and whose config is the run's config.json. Needs `pip install wandb`; the import
    happens here, in the constructor, so a missing package fails before training starts.

    project, name and any other keyword are passed to `wandb.init` (name defaults to the run
    directory's name)."""

    def __init__(self, project: str | None = None, name: str | None = None, **init_kwargs: Any):
        self._wandb = require("wandb", what="logging to Weights & Biases")
        self._init = {"project": project, "name": name, **init_kwargs}
        self._run = None

    def on_train_start(self, run_dir: Path) -> None:
        cfg_path = Path(run_dir) / "config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        init = {**self._init, "name": self._init["name"] or Path(run_dir).name}
        self._run = self._wandb.init(dir=str(run_dir), config=config, **init)

    def on_log(self, step: int, metrics: dict[str, Any]) -> None:
        self._log("train/", step, metrics)

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        self._log("val/", step, metrics)

    def _log(self, prefix: str, step: int, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            data: dict[str, Any] = {prefix + k: v for k, v in scalars(metrics)}
            data.update({k: self._wandb.Histogram(v) for k, v in per_layer_values(metrics)})
            self._run.log(data, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _array(values: list[float]):
    import numpy as np

    return np.asarray(values, dtype=np.float64)
