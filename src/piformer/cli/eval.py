"""`piformer eval`: loss and perplexity of a run, checkpoint or Hugging Face model on data or text."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "eval"
HELP = ("print the loss and perplexity (exp of mean cross-entropy) of a run, checkpoint or Hugging Face model "
        "directory on a prepared data directory's val split, a text file or a glob")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="run directory, checkpoint directory, or Hugging Face model directory")
    p.add_argument("--data", default=None,
                   help="prepared data directory (scores its val split), text file, or quoted glob such as "
                        "'docs/**/*.md' (default: the run's data directory)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint of a run")
    p.add_argument("--which", dest="checkpoint", choices=("best", "last"), help=argparse.SUPPRESS)  # deprecated alias
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or a directory with one) for text, when the model has none of its own")
    p.add_argument("--batches", type=int, default=None, help="score only this many batches (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from piformer.evaluate import evaluate

    r = evaluate(args.model, args.data, which=args.checkpoint, max_batches=args.batches,
                 batch_size=args.batch_size, device=args.device, tokenizer=args.tokenizer)
    if r["data_kind"] == "data":  # the keys earlier versions printed for a val split, kept for scripts
        r.update(val_loss=r["loss"], val_tokens=r["tokens"], checkpoint=r["model"], data_dir=r["data"])
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        step = f" (step {r['step']})" if r["step"] is not None else ""
        what = "val split of " if r["data_kind"] == "data" else ""
        print(f"{r['model']}{step}: loss {r['loss']:.4f} ± {r['loss_stderr']:.4f}, ppl {r['ppl']:.3f} "
              f"over {r['tokens']:,} tokens of {what}{r['data']}")
    if r["warning"]:
        print(f"piformer eval: warning: {r['warning']}", file=sys.stderr)
    return 0
