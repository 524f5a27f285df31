"""Is the secure forward right on real prompts, not one window or random ids? (issue 12)

Trains a small model on the built-in corpus if the run directory has none (or takes --run),
then runs N windows of T real tokens from its validation split (evenly spaced, so N different
texts) under SPU with both parties as threads of this process, each compared with the
plaintext program: argmax agreement over all N x T next-token predictions, and the largest
|secure - plaintext| logit. The prompts share one secure session (compiled once, SPU's setup paid
once; `--session-per-prompt` gives each its own and records its bytes). Every prompt is appended
to the results file as it ends; a rerun skips prompts already measured.

    nohup python benchmarks/bench_pi_prompts.py > out/bench_pi_prompts.log 2>&1 &
    python benchmarks/bench_pi_prompts.py --settings optimised-lsb-error --prompts 8
    python benchmarks/bench_pi_prompts.py --report-only
    # GPT-2-small shape, the end-to-end run's checkpoint (docs/private_inference.md, 'The whole model'):
    python benchmarks/bench_pi_prompts.py --run out/e2e/SM+ScFuFFN --seq-len 32 --prompts 32 \
        --exp-clip 20 --causal-pack --ln-wide
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from piformer.fileio import atomic_write_text  # noqa: E402

PIFORMER = [sys.executable, "-m", "piformer.cli"]


def train(run: Path, args) -> None:
    cmd = PIFORMER + ["train", "--preset", args.preset, "--size", "tiny", "--out", str(run), "--quiet",
                      "--set", f"model.n_layer={args.layers}", "--set", f"model.n_embd={args.width}",
                      "--set", f"model.n_head={args.heads}", "--set", f"model.block_size={args.seq_len}",
                      "--set", f"train.max_steps={args.steps}",
                      "--set", "train.batch_size=16", "--set", "train.micro_batch_size=16", "--set", "train.lr=1e-3",
                      "--set", f"train.eval_interval={args.steps}", "--set", f"train.checkpoint_interval={args.steps}"]
    print("$ piformer " + " ".join(cmd[3:]), flush=True)
    for step in (PIFORMER + ["data", "prepare", "--quiet"], cmd):
        if subprocess.run(step, cwd=ROOT).returncode:
            raise SystemExit(f"training failed: {' '.join(step)}")


def measure(args) -> list[dict]:
    from piformer.checkpoint import load_model
    from piformer.pi.jax_forward import state_dict_to_numpy
    from piformer.pi.secure import run_secure, run_secure_prompts
    from piformer.pi.spu_backend import SPUSettings
    from piformer.pi.tokens import validation_windows

    run = Path(args.run)
    if not (run / "checkpoints" / "best" / "model.safetensors").exists():
        train(run, args)
    model = load_model(run)
    sd, cfg = state_dict_to_numpy(model), model.config
    settings = SPUSettings.preset(args.settings, exp_clip=args.exp_clip, causal_pack=args.causal_pack,
                                  ln_wide=args.ln_wide)
    path = Path(args.results)
    rows = json.loads(path.read_text()) if path.exists() else []
    label = args.settings + ("" if args.exp_clip is None else f",exp_clip={args.exp_clip:g}")
    label += ",causal_pack" * args.causal_pack + ",ln_wide" * args.ln_wide
    todo = []
    prompts, _ = validation_windows(run, args.seq_len, args.prompts, cfg.vocab_size, cfg.block_size)
    for i, ids in enumerate(prompts):
        key = {"run": str(run), "settings": label, "seq_len": args.seq_len, "prompt": i}
        if not any(all(r.get(k) == v for k, v in key.items()) for r in rows):
            todo.append((key, ids))

    def save(key: dict, ids: np.ndarray, a: dict, seconds: float, **extra) -> None:
        rows.append({**key, "first_ids": [int(t) for t in ids[:8]], "predictions": int(len(ids)),
                     "disagreements": a["argmax_disagreements"],
                     "argmax_agreement": a["argmax_agreement"], "max_abs_logit_error": a["max_abs_logit_error"],
                     "max_abs_logit": a["max_abs_logit"], **extra, "elapsed_s": round(seconds, 1)})
        atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
        print(f"prompt {key['prompt'] + 1}/{args.prompts}: argmax {a['argmax_agreement']:.1%}, "
              f"max |dlogit| {a['max_abs_logit_error']:.3g}, {rows[-1]['elapsed_s']} s", flush=True)

    if args.session_per_prompt:  # compile and setup pass per prompt, bytes measured per prompt
        for key, ids in todo:
            t0 = time.perf_counter()
            r = run_secure(sd, cfg, ids, settings, vocab_chunk=args.vocab_chunk)
            save(key, ids, r.accuracy, time.perf_counter() - t0, bytes=r.total_bytes)
    elif todo:  # one session: compiled once, one setup pass, then prompt after prompt
        run_secure_prompts(sd, cfg, np.stack([ids for _, ids in todo]), settings, vocab_chunk=args.vocab_chunk,
                           on_prompt=lambda p: save(todo[p.index][0], todo[p.index][1], p.accuracy, p.seconds,
                                                    session="shared"))
    return rows


def report(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["run"], r["settings"], r["seq_len"]), []).append(r)
    out = ["| run | settings | T | prompts | predictions | argmax agreement | max abs logit error | "
           "prompts beyond 0.5 | disagreements (plaintext top-2 gap) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for (run, settings, T), rs in groups.items():
        n = sum(r["predictions"] for r in rs)
        agree = sum(r["argmax_agreement"] * r["predictions"] for r in rs) / n
        worst = max(r["max_abs_logit_error"] for r in rs)
        bad = sum(r["max_abs_logit_error"] > 0.5 for r in rs)
        flips = [f"{f['plaintext_top2_gap']:.2g}" for r in rs for f in r.get("disagreements", [])]
        out.append(f"| {run} | {settings} | {T} | {len(rs)} | {n} | {agree:.2%} | {worst:.3g} | {bad} | "
                   f"{len(flips)} ({', '.join(flips) or '-'}) |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="out/prompts/SM+ScFuFFN", help="run directory (trained here if empty)")
    p.add_argument("--preset", default="SM+ScFuFFN", help="architecture to train when --run is empty")
    p.add_argument("--layers", type=int, default=4, help="blocks of the model trained here")
    p.add_argument("--width", type=int, default=128, help="n_embd of the model trained here")
    p.add_argument("--heads", type=int, default=4, help="heads of the model trained here")
    p.add_argument("--steps", type=int, default=300, help="training steps of the model trained here")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--prompts", type=int, default=32, help="validation windows to run")
    p.add_argument("--settings", default="optimised", help="SPU settings preset")
    p.add_argument("--exp-clip", type=float, default=None, help="clamp softmax inputs at -CLIP (see pi-run)")
    p.add_argument("--causal-pack", action="store_true", help="softmax over visible entries only (see pi-run)")
    p.add_argument("--ln-wide", action="store_true", help="LayerNorm valid beyond rsqrt's range (see pi-run)")
    p.add_argument("--vocab-chunk", type=int, default=2048, help="vocabulary rows per embedding/head product")
    p.add_argument("--session-per-prompt", action="store_true",
                   help="a session (compile, setup pass) per prompt, with its bytes; default: one session for all")
    p.add_argument("--results", default="results/pi/prompts.json")
    p.add_argument("--report-only", action="store_true", help="print the saved table")
    args = p.parse_args()
    path = Path(args.results)
    if args.report_only:
        rows = json.loads(path.read_text()) if path.exists() else []
    else:
        rows = measure(args)
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
