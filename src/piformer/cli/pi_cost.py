"""`piformer pi-cost`: analytic private-inference cost (nonlinear ops, FLOPs, MACs)."""

from __future__ import annotations

import argparse
import json

from piformer.pi.spu_backend import SETTINGS_PRESETS

from ._types import positive_int

NAME = "pi-cost"
HELP = "count nonlinear operations, FLOPs and MACs of an architecture (the paper's Tables 2, 3, 6, 7)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", help="run/checkpoint directory or config.json (instead of --preset)")
    p.add_argument("--preset", help="architecture preset, e.g. SM+ScFuFFN (see `piformer presets`)")
    p.add_argument("--size", default="gpt2-small", help="size preset (default: gpt2-small)")
    p.add_argument("--seq-len", type=positive_int, help="sequence length T (default: the model's block_size)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a ModelConfig field, e.g. --set vocab_size=16384 (repeatable)")
    p.add_argument("--secure", action="store_true",
                   help="also predict secure-inference communication, messages and LAN/WAN latency from costs "
                        "fitted to SPU measurements (no SPU run; see docs/private_inference.md)")
    p.add_argument("--settings", default="default", choices=tuple(SETTINGS_PRESETS),
                   help="with --secure: the SPU settings to predict for (default: default)")
    p.add_argument("--vocab-chunk", type=positive_int, default=4096,
                   help="with --secure: vocabulary rows per embedding/head product, as pi-run (default 4096)")
    p.add_argument("--last-only", action="store_true",
                   help="with --secure: project and reveal only the last position's logits")
    p.add_argument("--exp-clip", type=float, default=None,
                   help="with --secure: price the softmax's clip of x - max at -CLIP, as pi-run --exp-clip")
    p.add_argument("--causal-pack", action="store_true",
                   help="with --secure: price the softmax on its visible (causal) entries only, "
                        "as pi-run --causal-pack")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from piformer.config import ModelConfig, parse_overrides
    from piformer.pi.cost import format_cost, load_model_config, paper_row, pi_cost

    if bool(args.run_dir) == bool(args.preset):
        raise ValueError("give either a run directory or --preset NAME (not both, not neither)")
    overrides = parse_overrides(args.set)["model"]
    if args.run_dir:
        cfg = load_model_config(args.run_dir)
        if overrides:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
        preset = None
    else:
        preset = args.preset
        seq = {"block_size": args.seq_len} if args.seq_len else {}
        cfg = ModelConfig.from_preset(preset, size=args.size, **{**seq, **overrides})
    cost = pi_cost(cfg, args.seq_len, preset=preset)
    row = paper_row(preset, cfg, cost.seq_len) if preset else None
    secure = None
    if args.secure:
        from piformer.pi.estimate import estimate
        from piformer.pi.spu_backend import SPUSettings

        settings = SPUSettings.preset(args.settings, exp_clip=args.exp_clip, causal_pack=args.causal_pack)
        secure = estimate(cfg, cost.seq_len, settings, vocab_chunk=args.vocab_chunk, last_only=args.last_only)

    if args.json:
        out = cost.to_dict()
        if row:
            out["paper"] = {"table": row[0], **row[1]}
        if secure:
            out["secure_estimate"] = secure.to_dict()
        print(json.dumps(out, indent=2))
        return 0
    print(format_cost(cost))
    if secure:
        from piformer.pi.estimate import format_estimate

        print("\n" + format_estimate(secure))
    if row:
        table, r = row
        print(f"\npaper Table {table}: {cost.nonlinear_str()} | FFN {r['ffn']} | Attn {r['attn']} | "
              f"comm {r['comm_gb']} GB | latency {r['lat_min']} min (WAN, measured by the authors)")
        ok = r["ffn"] == cost.ffn_flops_str and r["attn"] == cost.attn_flops_str
        print(f"  FLOPs match the paper: {'yes' if ok else 'NO'}")
    return 0
