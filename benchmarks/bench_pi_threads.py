"""How the compute term of secure-inference latency scales with cores (issue 12).

Runs `piformer pi-run CKPT --json --quiet` pinned with `taskset` to 1 core and to 2 cores,
interleaved (1, 2, 1, 2, ...), on one checkpoint, and reports the median wall seconds of the
secure pass and per operator class. Both parties run in the one process, so with n cores each
party has about n/2. From the two medians it fits t(n) = serial + parallel / n (Amdahl) and says
what that would mean for the paper's setting (two machines, 32 threads each): a projection
from two points, labelled as such, not a measurement.

    python benchmarks/bench_pi_threads.py                     # builds a mid-sized random checkpoint
    python benchmarks/bench_pi_threads.py --ckpt RUN_DIR --seq-len 64 --repeat 3
    python benchmarks/bench_pi_threads.py --report-only

Results go to results/pi/threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from piformer.fileio import atomic_write_text  # noqa: E402


def make_checkpoint(preset: str, out: Path) -> Path:
    import torch

    from piformer.checkpoint import save_checkpoint
    from piformer.config import ModelConfig
    from piformer.model import PiGPT

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, size="tiny", n_layer=2, n_embd=256, n_head=4, block_size=64,
                                  vocab_size=2048)
    return save_checkpoint(out, PiGPT(cfg))


def run_pinned(cpus: str, ckpt: Path, args) -> dict:
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "piformer.cli", "pi-run", str(ckpt), "--seq-len",
           str(args.seq_len), "--settings", args.settings, "--json", "--quiet", "--vocab-chunk", "1024"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode not in (0, 4):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    r = json.loads(proc.stdout)
    return {"cpus": cpus, "wall_s": r["wall_s"], "setup_s": r["setup"].get("seconds"),
            "per_class_s": {k: v["seconds"] for k, v in r["per_class"].items()}, "bytes": r["total_bytes"]}


def summarise(rows: list[dict]) -> dict:
    by = {}
    for r in rows:
        by.setdefault(len(r["cpus"].split(",")), []).append(r["wall_s"])
    med = {n: statistics.median(v) for n, v in sorted(by.items())}
    out = {"median_wall_s": med, "runs": {n: len(v) for n, v in by.items()}}
    if 1 in med and 2 in med and med[2] < med[1]:  # no speed-up measured: nothing to extrapolate
        parallel = 2 * (med[1] - med[2])  # t1 = s + p, t2 = s + p/2
        serial = med[1] - parallel
        out.update({"speedup_2_over_1": med[1] / med[2], "amdahl_serial_s": serial, "amdahl_parallel_s": parallel,
                    "parallel_fraction": parallel / med[1],
                    # the paper: one 32-thread machine per party; here n cores serve both parties
                    "projected_speedup_64_cores": med[1] / (serial + parallel / 64)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="checkpoint or run directory (default: a random SM+LN+G, d=256)")
    p.add_argument("--preset", default="SM+LN+G", help="preset of the default checkpoint")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--settings", default="default", choices=("default", "optimised"))
    p.add_argument("--repeat", type=int, default=3, help="runs per core count (interleaved)")
    p.add_argument("--results", default="results/pi/threads.json")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    path = Path(args.results)
    saved = json.loads(path.read_text()) if path.exists() else {"runs": []}
    if not args.report_only:
        if len(os.sched_getaffinity(0)) < 2:
            raise SystemExit("needs at least 2 cores")
        ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(args.preset, Path(tempfile.mkdtemp()) / "ckpt")
        rows = []
        for i in range(args.repeat):
            for cpus in ("0", "0,1"):
                row = run_pinned(cpus, ckpt, args)
                rows.append(row)
                print(f"run {i}: {len(cpus.split(','))} core(s): {row['wall_s']:.1f} s", flush=True)
        saved = {"command": " ".join(["python", "benchmarks/bench_pi_threads.py"] + sys.argv[1:]),
                 "checkpoint": str(args.ckpt or f"random {args.preset}, L=2, d=256, H=4, V=2048"),
                 "seq_len": args.seq_len, "settings": args.settings, "runs": rows}
        saved["summary"] = summarise(rows)
        atomic_write_text(path, json.dumps(saved, indent=1) + "\n")
    print(json.dumps(saved.get("summary", {}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
