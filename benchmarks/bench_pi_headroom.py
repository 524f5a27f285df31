"""Which block of a trained model goes wrong under SPU, and does a wider ring fix it?

A softmax-only GPT-2 whose residual stream grows layer by layer (no LayerNorm) can come back
from a whole-model secure run with wrong logits although every setting is safe. This runs single
blocks of the same checkpoint under SPU, each entered from its exact plaintext input (the
plaintext program's activation before that block, as the client's private input), and checks
the block's output against plaintext, in FM64 and FM128. A block wrong in FM64 and right in
FM128 ran out of fixed-point headroom; a block wrong in both is something else.

    python benchmarks/bench_pi_headroom.py out/e2e/SM+ScFuFFN --blocks 5 9 11 --fields FM64 FM128
    python benchmarks/bench_pi_headroom.py --report-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from piformer.fileio import atomic_write_text  # noqa: E402

RESULTS = ROOT / "results/pi/headroom.json"


def block_alone(sd: dict, cfg, l: int, x_in: np.ndarray):
    """(state dict, config, ids) of a one-block model whose block is block `l` of `sd` and whose
    secure input (embed_head=False: wte[ids] + wpe) is exactly `x_in`."""
    from dataclasses import replace

    T = x_in.shape[0]
    one = {k.replace(f"transformer.h.{l}.", "transformer.h.0."): v for k, v in sd.items()
           if not k.startswith("transformer.h.") or k.startswith(f"transformer.h.{l}.")}
    one["transformer.wte.weight"] = x_in.astype(np.float32)  # row i is position i's input
    one["transformer.wpe.weight"] = np.zeros((T, cfg.n_embd), np.float32)
    return one, replace(cfg, n_layer=1, vocab_size=T, block_size=T), np.arange(T)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="a run directory (its best checkpoint)")
    p.add_argument("--blocks", type=int, nargs="+", default=[11], help="which blocks (0-based)")
    p.add_argument("--fields", nargs="+", default=["FM64", "FM128"], choices=("FM64", "FM128"))
    p.add_argument("--settings", default="optimised")
    p.add_argument("--exp-clip", type=float, default=20.0)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.report_only:
        from piformer.checkpoint import load_model, resolve_checkpoint
        from piformer.pi import jax_forward as jf
        from piformer.pi.secure import run_secure
        from piformer.pi.spu_backend import SPUSettings

        model = load_model(resolve_checkpoint(Path(args.run), "best")).eval()
        cfg, sd = model.config, jf.state_dict_to_numpy(model)
        ids = np.fromfile(ROOT / "data/builtin/val.bin", dtype=np.uint16)[: args.seq_len].astype(np.int64)
        program = jf.build_program(cfg, args.seq_len, exp_clip=args.exp_clip)
        params = jf.chunk_params(jf.prepare_params(sd, cfg, args.seq_len), program.vocab_chunks)
        env = jf.run_program(program, {**params, **jf.one_hot_chunks(ids, program.vocab_chunks)})
        for l in args.blocks:
            x_in = np.asarray(env["x.emb" if l == 0 else f"x.{l - 1}"])
            scores = np.asarray(env[f"h{l}.s"])
            one, one_cfg, one_ids = block_alone(sd, cfg, l, x_in)
            for fld in args.fields:
                key = f"{args.run}/block{l}/{fld}/{args.settings}/exp_clip={args.exp_clip:g}"
                if key in results:
                    print(f"{key}: saved already", flush=True)
                    continue
                settings = SPUSettings.preset(args.settings, field=fld, exp_clip=args.exp_clip)
                t0 = time.perf_counter()
                r = run_secure(one, one_cfg, one_ids, settings, embed_head=False)
                plain = np.asarray(env[f"x.{l}"])
                err = np.abs(r.logits - plain)
                results[key] = {"block": l, "field": fld, "settings": args.settings, "exp_clip": args.exp_clip,
                                "input_absmax": float(np.abs(x_in).max()), "scores_absmax": float(np.abs(scores).max()),
                                "output_absmax": float(np.abs(plain).max()), "max_abs_error": float(err.max()),
                                "max_rel_error": float(err.max() / np.abs(plain).max()),
                                "rows_off_by_more_than_1pc": int((err.max(-1) > 0.01 * np.abs(plain).max()).sum()),
                                "bytes": r.total_bytes, "seconds": round(time.perf_counter() - t0, 1)}
                atomic_write_text(RESULTS, json.dumps(results, indent=1) + "\n")
                print(f"{key}: {results[key]}", flush=True)
    print(report(results))


def report(results: dict) -> str:
    lines = ["| run, block | ring | input max abs | scores max abs | output max abs | max abs error | "
             "relative | rows off > 1% |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, v in results.items():
        run = key.split("/block")[0]
        lines.append(f"| {run}, block {v['block']} | {v['field']} | {v['input_absmax']:.3g} | {v['scores_absmax']:.3g} | "
                     f"{v['output_absmax']:.3g} | {v['max_abs_error']:.3g} | {v['max_rel_error']:.2e} | "
                     f"{v['rows_off_by_more_than_1pc']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
