"""pi-run's accounting against the whole forward pass run as ONE SPU executable (issue 12).

For each (preset, settings): a tiny model (L=2, d=32) with a GPT-2-like vocabulary chunking
(V=8192 in chunks of 4096), T=16. `run_as_one_program` gives the bytes and messages of setup +
one inference with nothing attributed; `run_secure` gives per-inference cost and the setup
pass's cost beyond steady state. They should add up.

    python benchmarks/bench_pi_harness.py                     # the table in docs/private_inference.md
    python benchmarks/bench_pi_harness.py --vocab 97 --chunk 40 --seq-len 8
    python benchmarks/bench_pi_harness.py --cases SM+ScFuFFN:default --steps   # + pi-run's per-step bytes
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="SM+ScFuFFN:default,SM+ScFuFFN:optimised,SM+LN+G:default,SM+LN+G:optimised",
                   help="comma-separated PRESET:SETTINGS pairs")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--chunk", type=int, default=4096, help="vocabulary chunk (default 4096)")
    p.add_argument("--seq-len", type=int, default=16, help="T (default 16)")
    p.add_argument("--steps", action="store_true",
                   help="also print pi-run's bytes and messages per step (same-shape steps should cost the same)")
    args = p.parse_args()

    import torch

    from piformer.config import ModelConfig
    from piformer.model import PiGPT
    from piformer.pi.harness import run_as_one_program
    from piformer.pi.jax_forward import state_dict_to_numpy
    from piformer.pi.secure import run_secure
    from piformer.pi.spu_backend import SPUSettings

    rows = []
    for case in args.cases.split(","):
        preset, settings_name = case.split(":")
        torch.manual_seed(0)
        model = PiGPT(ModelConfig.from_preset(preset, size="tiny", vocab_size=args.vocab)).eval()
        ids = np.random.default_rng(0).integers(0, args.vocab, args.seq_len)
        sd, settings = state_dict_to_numpy(model), SPUSettings.preset(settings_name)
        one = run_as_one_program(sd, model.config, ids, settings, vocab_chunk=args.chunk)
        r = run_secure(sd, model.config, ids, settings, vocab_chunk=args.chunk)
        ours = r.total_bytes + r.setup["bytes"]
        rows.append(f"| {preset}, {settings_name} | {one['bytes'] / 1e6:.3f}, {one['messages']:,} | "
                    f"{r.total_bytes / 1e6:.3f} + {r.setup['bytes'] / 1e6:.3f} = {ours / 1e6:.3f}, "
                    f"{r.total_messages + r.setup['messages']:,} | {ours / one['bytes'] - 1:+.2%} |")
        print(rows[-1], flush=True)
        if args.steps:
            for st in r.steps:
                print(f"    {preset}, {settings_name}: {st['name']:<14} {st['bytes']:>12,d} B {st['messages']:>6,d} messages")
    print(f"\ntiny models (L=2, d=32), V={args.vocab} in chunks of {args.chunk}, T={args.seq_len}\n")
    print("| model, settings | one program (MB, messages) | pi-run per inference + setup (MB, messages) | bytes |")
    print("|---|---|---|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
