"""`piformer report`: rebuild a study's report from its run files (no training)."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = ("rebuild RUN_ROOT's figures, report.md, report.html and results.json from its run files; "
        "optionally the README's results")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_root", help="a study's run root (what `piformer reproduce --out` wrote)")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help="also rewrite the results section of this README from RUN_ROOT/results.json")
    p.add_argument("--section", default="cpu", help="which README results section to rewrite (default cpu)")
    p.add_argument("--no-figures", action="store_true",
                   help="keep RUN_ROOT/figures as they are (default: redraw them from the runs' entropy.json "
                        "and metrics.jsonl; no model is loaded)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from piformer.readme_results import update_readme
    from piformer.report import build, draw_figures

    root = Path(args.run_root)
    if not (root / "reproduce.json").is_file():
        raise FileNotFoundError(f"{root} holds no study (no reproduce.json); run `piformer reproduce --out {root}` first")
    paths = build(root, figures=None if args.no_figures else draw_figures(root))
    print(f"report: {paths['html']} and {paths['md']}")
    if args.readme:
        results = json.loads(paths["results"].read_text())
        changed = update_readme(args.readme, results, args.section, args.run_root.rstrip("/"))
        print(f"{args.readme}: results section {'rewritten' if changed else 'already up to date'}")
    return 0
