"""`piformer entropy RUN_DIR...`: per-head attention entropy, bands, diagnosis, figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._types import positive_int

NAME = "entropy"
HELP = ("measure per-head attention entropy of runs (or HF model dirs) on validation data: "
        "bands, overload/collapse diagnosis, comparison tables and figures")

_EPILOG = """\
examples:
  piformer entropy runs/a runs/b --out figs/          table per run, comparison, figures in figs/
  piformer entropy runs/* --data data/builtin --json  everything as JSON on stdout
  piformer entropy path/to/gpt2 --text val.txt        a HF transformers model directory (needs transformers)

Entropy is Eq. 7 of the paper (nats): each query row's Shannon entropy, averaged over rows and
sequences. Bands are fractions of heads in [0, max/4), [max/4, max/2), [max/2, 3max/4), [3max/4, max]
with max = the largest head entropy of the run (paper Fig. 2a), and again with max = log T.
"""


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v




def add_arguments(p: argparse.ArgumentParser) -> None:
    from piformer.cli._options import add_checkpoint_argument

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="piformer run directories (or checkpoint dirs, or HF transformers model dirs)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="prepared data directory (val.bin + meta.json); default: the one recorded in each "
                        "RUN_DIR/config.json")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="HF model directories only: measure on this text file, tokenized with the model's own tokenizer")
    p.add_argument("--json", action="store_true", help="print the full analysis as JSON on stdout")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write figures (PNG and SVG), entropy.json and entropy.txt to DIR")
    p.add_argument("--formats", default="png,svg", help="figure formats, comma-separated (png, svg, pdf)")
    p.add_argument("--batches", type=positive_int, default=8, help="validation batches per run")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per sequence T (default: the model's block_size; HF models: min(128, context))")
    add_checkpoint_argument(p, help="which checkpoint of a run directory to analyse (falls back to the other)")
    p.add_argument("--reference", choices=("logT", "causal"), default="logT",
                   help="what the diagnosis thresholds are fractions of: log T (the paper's E_max) or the "
                        "entropy of a uniform causal head (the most a causal head can reach)")
    p.add_argument("--overload-frac", type=_fraction, default=0.75,
                   help="a head is overloaded when E >= this x reference")
    p.add_argument("--collapse-frac", type=_fraction, default=0.25,
                   help="a head is collapsed when E < this x reference")
    p.add_argument("--layer-share", type=_fraction, default=0.5,
                   help="a layer is flagged when at least this share of its heads are")
    p.add_argument("--name", action="append", default=None, metavar="LABEL",
                   help="label for a run in tables and figures (repeat once per RUN_DIR, in order)")
    p.add_argument("--keep-going", action="store_true",
                   help="skip runs that cannot be analysed (e.g. diverged before their first checkpoint), "
                        "report them, and exit 1; default: stop at the first")
    p.add_argument("--device", default="cpu", help="torch device for the forward passes: cpu or cuda (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from piformer.analysis import analyse_paths, format_comparison, format_result, make_all_figures

    if args.collapse_frac >= args.overload_frac:
        raise ValueError(f"--collapse-frac ({args.collapse_frac}) must be below --overload-frac ({args.overload_frac})")
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise ValueError(f"--formats: unknown format(s) {bad or formats}; valid: png, svg, pdf")
    errors: list[tuple[str, str]] | None = [] if args.keep_going else None
    results = analyse_paths(
        args.runs, args.data, names=args.name, text=args.text, errors=errors,
        batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len, which=args.checkpoint,
        device=args.device, progress=not args.quiet and not args.json,
        reference=args.reference, overload_frac=args.overload_frac, collapse_frac=args.collapse_frac,
        layer_share=args.layer_share,
    )
    for path, msg in errors or []:
        print(f"piformer entropy: skipped {path}: {msg}", file=sys.stderr)
    if not results:
        raise ValueError("no run could be analysed")
    figures = None
    if args.out:
        figures = make_all_figures(results, args.out, formats=formats)
    text = "\n\n".join(format_result(r) for r in results)
    if len(results) > 1:
        text += "\n\n" + format_comparison(results)
    payload = {
        "runs": [r.to_dict() for r in results],
        "figures": None if figures is None else {k: [str(p) for p in v] for k, v in figures.all_paths.items()},
        "figures_skipped": None if figures is None else figures.skipped,
        "errors": [{"path": p, "error": m} for p, m in errors or []],
    }
    if args.out:
        out = Path(args.out)
        (out / "entropy.json").write_text(json.dumps(payload, indent=1) + "\n")
        (out / "entropy.txt").write_text(text + "\n")
    if args.json:
        json.dump(payload, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 1 if errors else 0
    print(text)
    if figures is not None:
        print()
        print(f"figures in {args.out}/ ({', '.join(formats)}):")
        for name, paths in figures.all_paths.items():
            print(f"  {name:14s} {paths[0]}")
        for name, why in figures.skipped.items():
            print(f"  {name:14s} skipped: {why}")
        print(f"  {'data':14s} {Path(args.out) / 'entropy.json'}, {Path(args.out) / 'entropy.txt'}")
    return 1 if errors else 0
