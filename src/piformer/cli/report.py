"""`piformer report`: rebuild a study's report from its run files (no training)."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "rebuild RUN_ROOT's report.md, report.html and results.json from its run files; optionally the README's results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_root", help="a study's run root (what `piformer reproduce --out` wrote)")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help="also rewrite the results section of this README from RUN_ROOT/results.json")
    p.add_argument("--section", default="cpu", help="which README results section to rewrite (default cpu)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from piformer.readme_results import update_readme
    from piformer.report import build

    root = Path(args.run_root)
    if not (root / "reproduce.json").is_file():
        raise FileNotFoundError(f"{root} holds no study (no reproduce.json); run `piformer reproduce --out {root}` first")
    paths = build(root)
    print(f"report: {paths['html']} and {paths['md']}")
    if args.readme:
        results = json.loads(paths["results"].read_text())
        changed = update_readme(args.readme, results, args.section, args.run_root.rstrip("/"))
        print(f"{args.readme}: results section {'rewritten' if changed else 'already up to date'}")
    return 0
