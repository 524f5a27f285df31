"""`piformer export-hf`: a run or checkpoint as a Hugging Face `transformers` model directory."""

from __future__ import annotations

import argparse

NAME = "export-hf"
HELP = ("write a run or checkpoint as a Hugging Face model directory (GPT2LMHeadModel for the Pre-LN presets, "
        "PiformerForCausalLM otherwise) with its tokenizer, loadable with AutoModelForCausalLM/AutoTokenizer")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_CKPT", help="run directory or checkpoint directory")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty, unless --force)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint of a run")
    p.add_argument("--format", default="auto", choices=("auto", "gpt2", "piformer"),
                   help="auto: GPT2LMHeadModel where the architecture allows, else PiformerForCausalLM")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or a data directory) to ship (default: the run's data directory's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    try:
        from piformer.hf.export import export_hf
    except ImportError as err:  # transformers missing: bad environment, reported in one line
        raise ValueError(str(err)) from None

    r = export_hf(args.source, args.out, which=args.checkpoint, format=args.format,
                  tokenizer=args.tokenizer, force=args.force)
    cls = "GPT2LMHeadModel" if r.format == "gpt2" else "PiformerForCausalLM"
    print(f"{r.out}: {cls} from {r.checkpoint}; logits match piformer's to {r.max_abs_diff:.1e}")
    if r.tokenizer is not None:
        print(f"  tokenizer: {r.tokenizer} (AutoTokenizer.from_pretrained('{r.out}'))")
    else:
        print("  warning: no tokenizer found (not a run directory); pass --tokenizer to ship one", flush=True)
    if r.dropped:
        print(f"  left out {len(r.dropped)} training-only tensors (the entropy regulariser's thresholds)")
    if r.format == "piformer":
        print(f"  load with: import piformer.hf, or AutoModelForCausalLM.from_pretrained('{r.out}', trust_remote_code=True)")
    return 0
