"""`piformer pi-serve`: the server side of two-process secure inference (holds the weights)."""

from __future__ import annotations

import argparse
import sys

NAME = "pi-serve"
HELP = "serve a checkpoint for secure inference: wait for a `piformer pi-query` client over TCP (SPU brpc link)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from piformer.cli._options import add_checkpoint_argument

    p.add_argument("run_dir", help="run directory or checkpoint directory")
    add_checkpoint_argument(p)
    p.add_argument("--listen", default="127.0.0.1:9531", help="this server's host:port (default 127.0.0.1:9531)")
    p.add_argument("--client", default="127.0.0.1:9530", help="the client's host:port (default 127.0.0.1:9530)")
    p.add_argument("--queries", type=int, default=1, help="queries to serve before exiting (default 1)")


def run(args: argparse.Namespace) -> int:
    from piformer.cli.pi_run import _require_spu

    _require_spu()
    from piformer.pi.secure import serve

    serve(args.run_dir, args.listen, args.client, which=args.checkpoint, max_queries=args.queries,
          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0
