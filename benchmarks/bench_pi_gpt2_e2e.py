"""GPT-2-small-shaped models run end to end under SPU: the whole forward pass, not blocks x 12.

For each preset: a short training run at GPT-2 small's shape (L=12, d=768, H=12, T=128, the
built-in corpus's vocabulary) so that the logits are a trained model's, then
`piformer pi-run RUN --seq-len 128 --settings optimised --json` on the run's first validation
window (128 real tokens: 128 next-token predictions, each checked against plaintext).

Every stage is a `piformer` command (printed, so it can be rerun by hand); every result is
saved as soon as it exists, and a rerun skips what is already saved. A pi-run that dies (the
OOM killer at a T too large for the machine) is saved too, under `<key>/failed`, with its exit
status and last progress line; a rerun tries it again.

    nohup python benchmarks/bench_pi_gpt2_e2e.py > out/bench_pi_gpt2_e2e.log 2>&1 &
    python benchmarks/bench_pi_gpt2_e2e.py --extrapolate   # also --layers 0 / 1: the x12 extrapolation, checked
    python benchmarks/bench_pi_gpt2_e2e.py --report-only   # the table in docs/private_inference.md
    python benchmarks/bench_pi_gpt2_e2e.py --presets SM+LN+G --causal-pack   # the packed softmax
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from piformer.fileio import atomic_write_text  # noqa: E402
from piformer.pi.spu_backend import SETTINGS_PRESETS  # noqa: E402

PIFORMER = [sys.executable, "-m", "piformer.cli"]


def sh(cmd: list[str], log: Path | None = None) -> subprocess.CompletedProcess:
    print("$", " ".join(["piformer"] + cmd[3:] if cmd[:3] == PIFORMER else cmd), flush=True)
    if log is None:
        return subprocess.run(cmd, cwd=ROOT, check=False)
    with open(log, "a") as f:
        return subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, check=False)


def train_command(preset: str, out: Path, args) -> list[str]:
    s = args.steps
    return PIFORMER + [
        "train", "--preset", preset, "--size", "gpt2-small", "--out", str(out), "--quiet",
        "--set", f"model.block_size={args.seq_len}", "--set", f"train.max_steps={s}",
        "--set", f"train.batch_size={args.batch}", "--set", f"train.micro_batch_size={args.batch}",
        "--set", "train.warmup=0.2", "--set", f"train.lr={args.lr}", "--set", f"train.eval_interval={s}",
        "--set", "train.eval_batches=4", "--set", f"train.checkpoint_interval={s}", "--set", "train.log_interval=10",
    ]


def pi_command(run: Path, args, layers: int | None = None) -> list[str]:
    extra = ([] if layers is None else ["--layers", str(layers)]) + (
        [] if args.exp_clip is None else ["--exp-clip", f"{args.exp_clip:g}"]) + (
        ["--causal-pack"] if args.causal_pack else []) + (["--ln-wide"] if args.ln_wide else [])
    return PIFORMER + ["pi-run", str(run), "--seq-len", str(args.seq_len), "--settings", args.settings, "--json",
                       *extra]


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def measure(preset: str, args, results: dict, layers: int | None = None) -> None:
    """One pi-run of the preset's checkpoint: the whole model, or (layers=0, 1) the parts the
    per-block extrapolation is built from."""
    run = Path(args.out) / preset
    if not (run / "checkpoints" / "best" / "model.safetensors").exists():
        if sh(["mkdir", "-p", str(run.parent)]).returncode or sh(train_command(preset, run, args)).returncode:
            raise SystemExit(f"training {preset} failed")
    key = (f"{preset}/{args.settings}/T{args.seq_len}" + ("" if args.exp_clip is None else f"/exp_clip={args.exp_clip:g}")
           + ("/causal-pack" if args.causal_pack else "") + ("/ln-wide" if args.ln_wide else "") + ("" if layers is None else f"/layers{layers}"))
    if key in results:
        print(f"{key}: saved already, skipped", flush=True)
        return
    cmd = pi_command(run, args, layers)
    command = " ".join(["piformer"] + cmd[3:])
    log = Path(args.out) / f"{preset}.pi-run.log"
    log_start = log.stat().st_size if log.exists() else 0  # the log is appended to: this run's part starts here
    t0 = time.perf_counter()
    proc = sh(cmd, log=log)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 4):  # 4 = ran, but the secure logits disagree with plaintext
        # A run that dies (the kernel's OOM killer: -9) is a result too: which shape did not fit,
        # how far it got. Saved under its own key so that a rerun tries it again.
        with open(log, "rb") as f:
            f.seek(log_start)
            progress = [ln for ln in f.read().decode(errors="replace").splitlines() if " done (step " in ln]
        results[f"{key}/failed"] = {"command": command, "exit_status": proc.returncode,
                                     "wall_s": round(wall, 1), "last_progress": progress[-1] if progress else None,
                                     "killed_by_signal": -proc.returncode if proc.returncode < 0 else None}
        atomic_write_text(Path(args.results), json.dumps(results, indent=1) + "\n")
        raise SystemExit(f"pi-run {preset} failed with exit status {proc.returncode} after {wall:.0f} s "
                         f"(last: {progress[-1] if progress else 'no progress line'}); saved to {args.results}; see {log}")
    report = json.loads(proc.stdout)
    status = json.loads((run / "status.json").read_text()) if (run / "status.json").exists() else {}
    results[key] = {"command": command, "exit_status": proc.returncode, "wall_s": round(wall, 1),
                    "train_command": " ".join(["piformer"] + train_command(preset, run, args)[3:]),
                    "train_best_val_loss": status.get("best_val_loss"), "train_step": status.get("step"), "report": report}
    atomic_write_text(Path(args.results), json.dumps(results, indent=1) + "\n")
    print(f"{key}: {report['total_bytes'] / 1e9:.3f} GB, saved to {args.results}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["SM+ScFuFFN", "SM+LN+R"])
    p.add_argument("--settings", default="optimised", choices=tuple(SETTINGS_PRESETS))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=100, help="training steps per model (a short run: trained logits)")
    p.add_argument("--batch", type=int, default=8, help="sequences per training step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (1e-3 diverged SM+ScFuFFN at step 26)")
    p.add_argument("--out", default="out/e2e", help="run directories and logs")
    p.add_argument("--results", default="results/pi/gpt2_e2e.json")
    p.add_argument("--exp-clip", type=float, default=None,
                   help="pi-run --exp-clip C (softmax-only models whose deep attention collapses need it)")
    p.add_argument("--causal-pack", action="store_true",
                   help="pi-run --causal-pack: each softmax exponentiates only its visible (causal) entries")
    p.add_argument("--ln-wide", action="store_true",
                   help="pi-run --ln-wide: LayerNorms right beyond SPU's rsqrt range (the softmax-only model's ln_f)")
    p.add_argument("--extrapolate", action="store_true",
                   help="also run --layers 0 and --layers 1 of each checkpoint: the per-block extrapolation, checked")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    results = load(Path(args.results))
    if not args.report_only:
        if not (ROOT / "data" / "builtin" / "meta.json").exists():
            sh(PIFORMER + ["data", "prepare", "--quiet"])
        for preset in args.presets:
            measure(preset, args, results)
        if args.extrapolate:
            for preset in args.presets:
                for layers in (0, 1):
                    measure(preset, args, results, layers)
    print(report(results))


def _gb(r: dict) -> float:
    return (r["total_bytes"] + r["reveal_bytes"]) / 1e9


def report(results: dict) -> str:
    """Markdown: each whole-model run, and the extrapolation from one block where both exist."""
    lines = ["| model, settings, T | per inference GB (incl. reveal) | setup GB | messages | compute min | "
             "max abs logit err | argmax agreement | extrapolated GB | extrapolation error | exit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, v in results.items():
        if "/layers" in key or "report" not in v:
            continue
        r = v["report"]
        acc = r["accuracy"]
        extra = ["—", "—"]
        parts = [results.get(f"{key}/layers{n}", {}).get("report") for n in (0, 1)]
        if all(parts):  # shared parts + L x (one block = layers1 - layers0)
            n_layer = r["config"]["n_layer"]
            ext = _gb(parts[0]) + n_layer * (_gb(parts[1]) - _gb(parts[0]))
            extra = [f"{ext:.3f}", f"{(ext - _gb(r)) / _gb(r):+.1%}"]
        lines.append(f"| {key} | {_gb(r):.3f} | {r['setup']['bytes'] / 1e9:.3f} | {r['total_messages']:,} | "
                     f"{r['wall_s'] / 60:.1f} | {acc['max_abs_logit_error']:.3g} | {acc['argmax_agreement']:.3f} | "
                     f"{extra[0]} | {extra[1]} | {v['exit_status']} |")
    lines += ["", "Per block, from the whole-model runs (steady state after the setup pass): L x any one block + "
              "the shared parts (embedding, final LayerNorm, head) against the measured total.", "",
              "| model, settings, T | shared MB | block MB min / max | worst error of L x one block + shared |",
              "|---|---:|---:|---:|"]
    for key, v in results.items():
        if "/layers" in key or "report" not in v:
            continue
        r = v["report"]
        blocks: dict[int, int] = {}
        for s in r["steps"]:
            m = re.match(r"h(\d+)\.", s["name"])
            if m:
                blocks[int(m.group(1))] = blocks.get(int(m.group(1)), 0) + s["bytes"]
        shared = r["total_bytes"] - sum(blocks.values())
        worst = max(abs(len(blocks) * b + shared - r["total_bytes"]) for b in blocks.values()) / r["total_bytes"]
        lines.append(f"| {key} | {shared / 1e6:.1f} | {min(blocks.values()) / 1e6:.1f} / {max(blocks.values()) / 1e6:.1f} "
                     f"| {worst:.2%} |")
    failed = [f"- {key}: exit status {v['exit_status']} after {v['wall_s'] / 60:.1f} min, last progress: "
              f"{v['last_progress'] or 'none'}" for key, v in results.items() if "report" not in v]
    if failed:
        lines += ["", "Runs that did not finish:", "", *failed]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
