"""`piformer <subcommand>`: a thin command line over the library.

Each subcommand lives in its own module in this package and defines
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
The modules are discovered here, so adding a command touches one file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import threading

from piformer.errors import RunInUseError, RunTerminated


def _subcommand_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            yield module


def _version() -> str:
    from piformer import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piformer",
        description="Language models for private inference: build, train, analyse "
        "attention entropy, and price models under two-party secure inference.",
        epilog="exit status: 0 done, 2 bad input (nothing written), 3 the run diverged (recorded), "
               "4 a secure result disagreed with plaintext (pi-run, reported), "
               "69 a peer did not answer, 74 I/O error, 75 the run directory is in use by another process, 130 interrupted, 143 terminated",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print piformer's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for module in _subcommand_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


EXIT_BAD_INPUT = 2
"""Bad input (a flag, a config value, a file that is missing or corrupt): one line, nothing written."""
EXIT_IN_USE = 75
"""A lost race: another process holds the run directory (sysexits' EX_TEMPFAIL: try again later)."""
EXIT_UNAVAILABLE = 69
"""A peer that did not answer (pi-query with no server): sysexits' EX_UNAVAILABLE."""
EXIT_IO = 74
"""An I/O failure (disk full, permission denied): sysexits' EX_IOERR."""
EXIT_TERMINATED = 143
"""SIGTERM (128 + 15), recorded in the run's status.json as 'terminated'."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + 2), recorded as 'interrupted'."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(code: int, what: str) -> int:
        print(f"piformer {args.command}: {what}", file=sys.stderr)
        return code

    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Bad input is reported as one line naming what was wrong, not a traceback.
        return fail(EXIT_BAD_INPUT, f"error: {err}")
    except RunInUseError as err:
        return fail(EXIT_IN_USE, f"busy: {err}")
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stderr.close()
        return 0
    except ConnectionError as err:  # a peer that is not there; below BrokenPipeError, its subclass
        return fail(EXIT_UNAVAILABLE, f"unreachable: {err}")
    except OSError as err:
        return fail(EXIT_IO, f"I/O error: {err}")
    except RunTerminated:
        return fail(EXIT_TERMINATED, "terminated (SIGTERM)")
    except KeyboardInterrupt as err:
        code = fail(EXIT_INTERRUPTED, f"interrupted: {err}" if str(err) else "interrupted")
        if threading.active_count() > 1:
            # Secure inference leaves SPU's party threads blocked in C++ on a peer that will not
            # answer; a normal interpreter exit would tear them down under the C++ runtime.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
