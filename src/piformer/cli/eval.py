"""`piformer eval`: validation loss and perplexity of a run's checkpoint."""

from __future__ import annotations

import argparse
import json

NAME = "eval"
HELP = "print validation loss and perplexity (exp of mean cross-entropy) of a run or checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (or a checkpoint directory)")
    p.add_argument("--data", default=None, help="prepared data directory (default: the one the run was trained on)")
    p.add_argument("--which", default="best", choices=("best", "last"), help="which checkpoint of a run")
    p.add_argument("--batches", type=int, default=None, help="score only this many batches (default: the whole val split)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from piformer.train import evaluate_run

    r = evaluate_run(args.run_dir, args.data, which=args.which, max_batches=args.batches,
                     batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{r['checkpoint']} (step {r['step']}): val loss {r['val_loss']:.4f}, ppl {r['ppl']:.3f} "
              f"over {r['val_tokens']:,} tokens of {r['data_dir']}")
    return 0
