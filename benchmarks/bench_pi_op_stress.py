"""Which SPU primitive returns the intermittent wrong values (issue 12)? Each op, many times.

A GPT-2-sized block under the then 'optimised' settings was wrong in about one run in four, and
a block run costs minutes. This runs the block's primitives one at a time at the block's shapes
(scores softmax 12x128x128, its exponential alone, LayerNorm 128x768, ReLU 128x3072, the q/k/v
matmul 128x768 @ 768x2304, a secret x secret product, and `mul_batches`: 32 separate products
of 16,384 elements), each compiled once and executed --repeat times in one session on fresh
random inputs (the client holds x, the server y, the op runs on secrets derived from both;
`piformer.pi.harness.run_op_repeatedly`), and checks every output against NumPy. A settings
variant (`--set k=v`) changes one SPU setting; `--fresh-session` opens a new link and runtimes
for every repetition instead of reusing one pair. Found: `mul_lsb_error` makes the
exponential's squarings return whole 8,192-value HE batches of garbage
(docs/private_inference.md, 'Wrong values').

    nohup python benchmarks/bench_pi_op_stress.py --repeat 20 > out/pi_op_stress.log 2>&1 &
    python benchmarks/bench_pi_op_stress.py --ops exp --set mul_lsb_error=true --repeat 25
    python benchmarks/bench_pi_op_stress.py --report-only

Every repetition is appended to results/pi/op_stress.json as it ends (op, settings, error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from piformer.fileio import atomic_write_text  # noqa: E402

HE_BATCH = 8192  # slots per CHEETAH multiplication ciphertext (SPU 0.9.5's CheetahMul poly degree)
MUL_CALLS = 32  # separate products per execution of the mul_batches op
WRONG = 1.0  # |error| beyond this is a wrong result; fixed-point imprecision here is ~1e-2


def _ops():
    import jax.numpy as jnp

    def softmax(x, y):
        s = x + y
        e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        return e / jnp.sum(e, axis=-1, keepdims=True)

    def layernorm(x, y):
        s = x + y
        mu = jnp.mean(s, axis=-1, keepdims=True)
        var = jnp.mean((s - mu) ** 2, axis=-1, keepdims=True)
        return (s - mu) / jnp.sqrt(var + 1e-5)

    def mul_batches(x, y):
        # One secret x secret product per row, each its own MulAA call: rows of 16,384 take
        # CHEETAH's direct path (two halves of one 8,192-slot HE batch each, run concurrently).
        a, b = x + y, x - y
        return jnp.stack([a[i] * b[i] for i in range(a.shape[0])])

    # name: (fn, x shape (client), y shape (server), input scale)
    return {
        "mul_batches": (mul_batches, (MUL_CALLS, 16384), (MUL_CALLS, 16384), 2.0),
        # SPU's exponential is 8 squarings (CHEETAH's SquareA, two OLEs run concurrently per call)
        "exp": (lambda x, y: jnp.exp(x + y - 4.0), (12, 128, 128), (12, 128, 128), 1.0),
        "mul": (lambda x, y: (x + y) * (x - y), (12, 128, 128), (12, 128, 128), 2.0),
        "softmax": (softmax, (12, 128, 128), (12, 128, 128), 2.0),
        "layernorm": (layernorm, (128, 768), (128, 768), 1.0),
        "relu": (lambda x, y: jnp.maximum(x + y, 0.0), (128, 3072), (128, 3072), 1.0),
        "matmul": (lambda x, y: (x * 1.0) @ y, (128, 768), (768, 2304), 0.05),
    }


def _numpy(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x.astype(np.float64), y.astype(np.float64)
    if name in ("mul", "mul_batches"):
        return (x + y) * (x - y)
    if name == "exp":
        return np.exp(x + y - 4.0)  # mostly <= 0, where the Taylor form is accurate
    if name == "softmax":
        s = x + y
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    if name == "layernorm":
        s = x + y
        mu = s.mean(-1, keepdims=True)
        return (s - mu) / np.sqrt(((s - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    if name == "relu":
        return np.maximum(x + y, 0.0)
    return x @ y


def stress(op: str, settings, repeat: int, fresh_session: bool, seed: int, record) -> None:
    from piformer.pi.harness import run_op_repeatedly

    fn, xs, ys, scale = _ops()[op]
    rng = np.random.default_rng(seed)
    draws = [(rng.normal(0, scale, xs).astype(np.float32), rng.normal(0, scale, ys).astype(np.float32))
             for _ in range(repeat)]
    sessions = [[i] for i in range(repeat)] if fresh_session else [list(range(repeat))]
    for reps in sessions:
        outs = run_op_repeatedly(fn, [draws[i] for i in reps], settings, op)
        for i, (secure, seconds) in zip(reps, outs):
            err = np.abs(secure.astype(np.float64) - _numpy(op, *draws[i]))
            wrong = np.flatnonzero(err > WRONG)
            where = {}
            if wrong.size:  # a contiguous flat range points at one failed batch of a primitive
                rows = np.unique(wrong // err.shape[-1])
                where = {"first_wrong": int(wrong[0]), "last_wrong": int(wrong[-1]), "wrong_rows": int(rows.size),
                         # which 8,192-slot blocks of the flat output (CHEETAH's HE batch size)
                         "wrong_he_batches": sorted({int(b) for b in wrong // HE_BATCH})[:16],
                         "wrong_values_sample": [float(v) for v in secure.reshape(-1)[wrong[:5]]]}
            record({"rep": i, "max_abs_error": float(err.max()), "n_wrong": int(wrong.size),
                    "numel": int(err.size), "exec_s": round(seconds, 3), **where})


def _value(text: str):
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="mul,softmax,layernorm,relu,matmul", help="comma-separated ops: "
                   "exp, mul, mul_batches, softmax, layernorm, relu, matmul")
    p.add_argument("--settings", default="optimised", help="SPU settings preset (default optimised)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one SPU setting")
    p.add_argument("--repeat", type=int, default=20, help="executions per op (default 20)")
    p.add_argument("--fresh-session", action="store_true", help="a new link and runtimes for every execution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="results/pi/op_stress.json")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    path = Path(args.results)
    rows = json.loads(path.read_text()) if path.exists() else []
    if not args.report_only:
        from piformer.pi.spu_backend import SPUSettings

        over = dict(kv.split("=", 1) for kv in args.set)
        settings = SPUSettings.preset(args.settings, **{k: _value(v) for k, v in over.items()})
        label = ",".join([args.settings] + [f"{k}={v}" for k, v in over.items()])
        for op in args.ops.split(","):
            def record(row, op=op):
                row = {"op": op, "settings": label, "fresh_session": args.fresh_session, "seed": args.seed,
                       "pid": os.getpid(), **row}
                rows.append(row)
                atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
                flag = "WRONG" if row["n_wrong"] else "ok"
                print(f"{op:<10} {label:<40} rep {row['rep']:>3}  max|err| {row['max_abs_error']:.3g}  "
                      f"{row['n_wrong']} wrong  {row['exec_s']} s  {flag}", flush=True)
            stress(op, settings, args.repeat, args.fresh_session, args.seed, record)
    # A session is one process (one link and pair of runtimes) unless --fresh-session; failures
    # may cluster by session, so sessions are counted too.
    summary: dict[tuple, list] = {}
    for r in rows:
        s = summary.setdefault((r["op"], r["settings"], r["fresh_session"]), [0, 0, set(), set()])
        session = (r["pid"], r["rep"]) if r["fresh_session"] else r["pid"]
        s[0] += 1
        s[1] += r["n_wrong"] > 0
        s[2].add(session)
        if r["n_wrong"]:
            s[3].add(session)
    print(f"\n{'op':<12} {'settings':<40} {'fresh':<6} {'runs':>5} {'wrong':>6} {'sessions':>9} {'with wrong':>11}")
    for (op, label, fresh), (n, bad, sessions, bad_sessions) in sorted(summary.items()):
        print(f"{op:<12} {label:<40} {str(fresh):<6} {n:>5} {bad:>6} {len(sessions):>9} {len(bad_sessions):>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
