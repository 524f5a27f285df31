"""Mutation testing of the core modules with mutmut 3, one module at a time, and a score table.

    tools/mutation.sh                      # every module, in priority order
    tools/mutation.sh entropy config       # some of them
    tools/mutation.sh --report             # the table of the last runs, without running anything
    tools/mutation.sh --survivors model    # the diff of every mutant of `model` that survived

Each module is mutated in its own scratch copy of the repository, mutants/<module>/, with the
[tool.mutmut] section of pyproject.toml narrowed to that module and to the test files that can
exercise it (MODULES below). Inside a module mutmut runs, for every mutant, only the tests that
called the mutated function during a first, traced run of those files. Keeping test_train.py
out of the selection for modules other than train and checkpoint is what makes the run
feasible: its end-to-end tests take minutes, and every config mutant would otherwise run them.

Score = killed / (killed + survived + timeout + suspicious + segfault); "no tests" (a function
no selected test calls) counts as a survivor too, since no test would see its mistake.
Not run in the default test suite (minutes to an hour); see docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants"

_FAST = ["tests/test_mutation_killers.py", "tests/test_properties.py"]
# module -> (source file, the test files that can exercise it). Priority order.
MODULES: dict[str, tuple[str, list[str]]] = {
    "entropy": ("src/piformer/entropy.py", ["tests/test_entropy.py", "tests/test_model.py", *_FAST]),
    "config": ("src/piformer/config.py", [
        "tests/test_config.py", "tests/test_model.py", "tests/test_pi_cost.py", "tests/test_checkpoint.py", *_FAST]),
    "model": ("src/piformer/model.py", [
        "tests/test_model.py", "tests/test_model_mutants.py", "tests/test_entropy.py", "tests/test_checkpoint.py", *_FAST]),
    "cost": ("src/piformer/pi/cost.py", ["tests/test_pi_cost.py", "tests/test_cost_mutants.py", *_FAST]),
    "checkpoint": ("src/piformer/checkpoint.py", ["tests/test_checkpoint.py", "tests/test_checkpoint_mutants.py", "tests/test_train.py", *_FAST]),
    "train": ("src/piformer/train.py", ["tests/test_train.py", "tests/test_train_mutants.py", *_FAST]),
}
KILLED = {"killed", "caught by type check"}
COUNTED = ("killed", "survived", "no tests", "timeout", "suspicious", "segfault")


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in items) + "]"


def _prepare(module: str, rev: str | None, overlay: list[str]) -> Path:
    """A fresh scratch copy of src/, tests/ and pyproject.toml for one module: from the working
    tree, or from commit `rev` with the working tree's `overlay` files on top."""
    work = WORK / module
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _copy(work, ["src", "tests"], rev, overlay)
    _write_selection(module, work)
    return work


def _write_selection(module: str, work: Path) -> None:
    """The scratch copy's pyproject.toml: [tool.mutmut] narrowed to the module and its tests."""
    src, tests = MODULES[module]
    text = (ROOT / "pyproject.toml").read_text()
    section = text.index("[tool.mutmut]")
    head, tool = text[:section], text[section:]
    tool = re.sub(r"only_mutate = \[.*?\]", f"only_mutate = {_toml_list([src])}", tool, flags=re.S)
    tool = re.sub(r"pytest_add_cli_args_test_selection = \[.*?\]",
                  f"pytest_add_cli_args_test_selection = {_toml_list(tests)}", tool, flags=re.S)
    # fastest tests first (tools/mutmut_fast_first.py, importable through PYTHONPATH, see run())
    tool = tool.replace('pytest_add_cli_args = [', 'pytest_add_cli_args = ["-p", "mutmut_fast_first", ', 1)
    (work / "pyproject.toml").write_text(head + tool)


def _copy(work: Path, parts: list[str], rev: str | None, overlay: list[str]) -> None:
    for part in parts:
        shutil.rmtree(work / part, ignore_errors=True)
    if rev is None:
        for part in parts:
            shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        return
    archive = subprocess.run(["git", "archive", rev, *parts], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive.stdout, check=True)
    for f in overlay:
        shutil.copy2(ROOT / f, work / f)


def _statuses(module: str) -> dict[str, str]:
    """mutant name -> status, from mutmut's record of the last run."""
    from mutmut.stats import status_by_exit_code

    src, _ = MODULES[module]
    meta = WORK / module / "mutants" / (src + ".meta")
    if not meta.is_file():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    statuses = {name: status_by_exit_code[code] for name, code in codes.items()}
    # mutmut's record keeps only the mutants a --recheck reran; those an earlier run killed are
    # remembered apart (_remember_killed) and count as killed, as they were.
    for name in _killed_before(module):
        if statuses.get(name) == "not checked":
            statuses[name] = "killed"
    return statuses


def _killed_before(module: str) -> set[str]:
    f = WORK / module / "killed_before_recheck.json"
    return set(json.loads(f.read_text())) if f.is_file() else set()


def _remember_killed(module: str) -> None:
    killed = _killed_before(module) | {n for n, st in _statuses(module).items() if st in KILLED}
    (WORK / module / "killed_before_recheck.json").write_text(json.dumps(sorted(killed), indent=0))


def _row(module: str) -> tuple[str, dict[str, int], float | None]:
    st = _statuses(module)
    counts = {k: sum(1 for s in st.values() if s == k) for k in COUNTED}
    counts["killed"] += sum(1 for s in st.values() if s == "caught by type check")
    other = len(st) - sum(counts.values())
    counts["not checked"] = other
    scored = sum(counts[k] for k in COUNTED)
    return module, counts, (counts["killed"] / scored if scored else None)


def report(modules: list[str]) -> str:
    cols = [*COUNTED, "not checked"]
    lines = ["| module | mutants | " + " | ".join(cols) + " | score |",
             "|---" * (len(cols) + 3) + "|"]
    for m in modules:
        _, counts, score = _row(m)
        total = sum(counts.values())
        if not total:
            lines.append(f"| {m} | (not run) |" + " |" * (len(cols) + 1))
            continue
        shown = f"{score:.1%}" if score is not None else "-"
        lines.append(f"| {m} | {total} | " + " | ".join(str(counts[c]) for c in cols) + f" | {shown} |")
    return "\n".join(lines)


def survivors(module: str) -> None:
    work = WORK / module
    for name, status in sorted(_statuses(module).items()):
        if status not in KILLED:
            print(f"## {status}: {name}")
            subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, check=False)


def run(module: str, jobs: int, names: list[str], rev: str | None = None, overlay: list[str] = (),
        recheck: bool = False, sample: int | None = None, seed: int = 0) -> int:
    if sample:
        # mutmut generates every mutant and traces the tests before it runs any; a name that
        # matches nothing stops it there, and its record then lists every mutant's name.
        _mutmut(module, jobs, ["__no_mutant_has_this_name__"], _prepare(module, rev, list(overlay)))
        everything = sorted(_statuses(module))
        names = sorted(random.Random(seed).sample(everything, min(sample, len(everything))))
        print(f"== {module}: a random sample of {len(names)} of {len(everything)} mutants (seed {seed})", flush=True)
        return _mutmut(module, jobs, names, WORK / module)
    if recheck:
        # Same mutants, new tests: refresh tests/ (mutmut copies it into mutants/ and traces the
        # tests it has not seen), then rerun every mutant that was not killed.
        work = WORK / module
        names = [n for n, st in _statuses(module).items() if st not in KILLED]
        if not names:
            return 0
        _remember_killed(module)
        _copy(work, ["tests"], rev, list(overlay))
        _write_selection(module, work)  # test files added to MODULES since the run count too
    else:
        work = _prepare(module, rev, list(overlay))
    return _mutmut(module, jobs, names, work)


def _mutmut(module: str, jobs: int, names: list[str], work: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = str(ROOT / "tools")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *names]
    print(f"== {module}: {' '.join(cmd[1:])}  (in {work.relative_to(ROOT)})", flush=True)
    log = work / "run.log"
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    tail = log.read_text().splitlines()[-3:]
    print("\n".join("   " + x[-200:] for x in tail), flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("modules", nargs="*", help=f"modules to mutate (default: all): {', '.join(MODULES)}")
    p.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    p.add_argument("--report", action="store_true", help="print the last runs' table and stop")
    p.add_argument("--survivors", action="store_true", help="show every surviving mutant's diff and stop")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="mutant names to run (fnmatch globs, e.g. 'piformer.train.x_lr_at*'); one module only")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="run a seeded random sample of N of the module's mutants (for modules whose every "
                        "mutant would take hours); the score is then an estimate")
    p.add_argument("--seed", type=int, default=0, help="with --sample: the sample's seed (default 0)")
    p.add_argument("--recheck", action="store_true",
                   help="rerun only the mutants the last run did not kill, against the current tests")
    p.add_argument("--rev", help="mutate commit REV's src/ and tests/ instead of the working tree's "
                   "(while others edit the tree)")
    p.add_argument("--overlay", action="append", default=[], metavar="FILE",
                   help="with --rev: a working-tree file copied over the commit's (repeatable)")
    args = p.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        p.error(f"unknown module(s) {', '.join(unknown)}; valid: {', '.join(MODULES)}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    modules = args.modules or list(MODULES)
    if args.only and len(modules) != 1:
        p.error("--only needs exactly one module")
    if args.survivors:
        for m in modules:
            survivors(m)
        return 0
    if not args.report:
        for m in modules:
            run(m, args.jobs, args.only, args.rev, args.overlay, args.recheck, args.sample, args.seed)
    print(report(modules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
