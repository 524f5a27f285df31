"""The server side of two-process secure inference as a library entry point:

    python -m piformer.pi.serve RUN_DIR [--checkpoint best|last] [--listen HOST:PORT] [--client HOST:PORT]

`piformer.pi.secure.run_two_process` starts its server child through this module rather than
through the `piformer` command line, so the library does not depend on its own CLI. `piformer
pi-serve` is the same server with the CLI's conventions (exit statuses, messages).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m piformer.pi.serve", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint (default best)")
    p.add_argument("--listen", default="127.0.0.1:9531", help="this server's host:port (default 127.0.0.1:9531)")
    p.add_argument("--client", default="127.0.0.1:9530", help="the client's host:port (default 127.0.0.1:9530)")
    p.add_argument("--queries", type=int, default=1, help="queries to serve before exiting (default 1)")
    args = p.parse_args(argv)

    from piformer.pi.secure import serve

    serve(args.run_dir, args.listen, args.client, which=args.checkpoint, max_queries=args.queries,
          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
