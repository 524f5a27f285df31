"""`piformer pi-query`: the client side of two-process secure inference (holds the tokens)."""

from __future__ import annotations

import argparse

from ._types import positive_float

NAME = "pi-query"
HELP = "query a `piformer pi-serve` server with private token ids; print the breakdown (and top next tokens)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from piformer.cli.pi_run import add_spu_arguments, add_token_arguments

    p.add_argument("--server", default="127.0.0.1:9531", help="the server's host:port (default 127.0.0.1:9531)")
    p.add_argument("--listen", default="127.0.0.1:9530", help="this client's host:port (default 127.0.0.1:9530)")
    p.add_argument("--run-dir", default=None,
                   help="optional: a run directory for the tokenizer/validation tokens (its weights are not read)")
    p.add_argument("--connect-timeout", type=positive_float, default=30.0,
                   help="seconds to wait for the server to answer before giving up (default 30)")
    add_token_arguments(p)
    add_spu_arguments(p)
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (by default one per embedding, block and head, with an ETA)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from piformer.cli.pi_run import _require_spu, print_report, settings_from_args

    _require_spu()
    import numpy as np

    from piformer.pi.secure import print_progress, query
    from piformer.pi.tokens import resolve_tokens

    settings = settings_from_args(args)
    source = {}

    def tokens_for(cfg):  # called once the server has told us the (public) architecture
        ids, source["tokens"] = resolve_tokens(args.run_dir, args.seq_len, cfg.vocab_size, cfg.block_size,
                                               args.tokens, args.text, args.seed)
        return ids

    report = query(tokens_for, args.server, args.listen, settings, vocab_chunk=args.vocab_chunk, layers=args.layers,
                   last_only=args.last_only, connect_timeout_s=args.connect_timeout,
                   progress=None if args.quiet else print_progress)
    top = np.argsort(-report.logits[-1])[:5].tolist()
    return print_report(report, args.json, extra={**source, "next_token_top5": top})
