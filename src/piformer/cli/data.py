"""`piformer data prepare|info|verify`: build, inspect and check token shards."""

from __future__ import annotations

import argparse
import json

NAME = "data"
HELP = "prepare a corpus (tokenizer + token shards), show what a data directory holds, or verify its shards"


def _size(text: str) -> int:
    """'500K', '12M', '1G' or a plain byte count."""
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500K, 12M, 1G)") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="<prepare|info|verify>", required=True)
    pr = sub.add_parser("prepare", help="tokenize a corpus into DIR (tokenizer.json, train.bin, val.bin, meta.json)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("--source", default="builtin",
                    help="builtin (this Python's stdlib .py files) | DIR | GLOB | hf:NAME[:SPLIT] | "
                         "hf:/path/to/saved_dataset | codeparrot (the paper's dataset, online)")
    pr.add_argument("--out", default=None, help="output directory (default: data/builtin for the built-in corpus)")
    pr.add_argument("--vocab-size", type=int, default=None,
                    help="BPE vocabulary to train (default: 8192 for a corpus up to 256 MB, 2048 under 1 MB, else 16384)")
    pr.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json (or a data dir holding one)")
    pr.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for validation")
    pr.add_argument("--val-source", default=None, help="hf sources: a separate validation dataset (hf:NAME[:SPLIT])")
    pr.add_argument("--max-files", type=int, default=None,
                    help="only the first N files in sorted order (rows, for hf sources): quick runs")
    pr.add_argument("--max-bytes", type=_size, default=None, help="only a sorted prefix of about this many bytes (e.g. 2M)")
    pr.add_argument("--include-tests", action="store_true",
                    help="builtin: also the stdlib's test suites (test/, tests/, idle_test/); ~3x the text")
    pr.add_argument("--text-field", default=None, help="hf sources: the text column (default: 'content', else 'text')")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    inf = sub.add_parser("info", help="print a prepared directory's meta.json summary")
    inf.add_argument("dir", help="prepared data directory")
    inf.add_argument("--json", action="store_true", help="print meta.json as is")
    ver = sub.add_parser("verify", help="check every shard's sha256 against meta.json (opening a directory "
                                        "checks sizes and hashes shards up to 64 MiB, larger ones by sampling)")
    ver.add_argument("dir", help="prepared data directory")
    ver.add_argument("--fast", action="store_true", help="only the check every open does (sizes and sampled hashes)")


def run(args: argparse.Namespace) -> int:
    from piformer.data import prepare, read_meta

    if args.data_command == "verify":
        from piformer.data import TokenData

        data = TokenData(args.dir, verify="fast" if args.fast else "full")  # raises on a mismatch
        print(f"{args.dir}: train {data.n_tokens('train'):,} and val {data.n_tokens('val'):,} tokens match "
              f"meta.json ({'sizes and sampled hashes' if args.fast else 'sha256 of every byte'})")
        return 0
    if args.data_command == "info":
        meta = read_meta(args.dir)
        if args.json:
            print(json.dumps(meta, indent=1))
        else:
            _summary(args.dir, meta)
        return 0

    out = args.out
    if out is None:
        if args.source != "builtin":
            raise ValueError("--out DIR is required for a source other than builtin")
        out = "data/builtin"
    meta = prepare(
        args.source, out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        val_fraction=args.val_fraction, max_files=args.max_files, max_bytes=args.max_bytes,
        include_tests=args.include_tests, text_field=args.text_field, val_source=args.val_source,
        progress=not args.quiet,
    )
    _summary(out, meta)
    return 0


def _summary(out: str, meta: dict) -> None:
    s = meta["splits"]
    print(f"{out}: source {meta['source']}, vocab {meta['vocab_size']} ({meta['dtype']}), "
          f"train {s['train']['tokens']:,} tokens / {s['train']['documents']} docs, "
          f"val {s['val']['tokens']:,} tokens / {s['val']['documents']} docs")
