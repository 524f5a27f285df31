"""The hand-made mistakes issue 14 found no test would notice, applied one at a time to a scratch
copy of the source; each must make a test fail. Complements tools/mutation.sh (mutmut's
mechanical mutants) with the mistakes a contributor would actually make.

    nice -n 19 .venv/bin/python tools/named_mutants.py            # all of them
    nice -n 19 .venv/bin/python tools/named_mutants.py resume     # those whose name contains 'resume'
    nice -n 19 .venv/bin/python tools/named_mutants.py --without tests/test_mutation_killers.py   # the suite before

Runs only tests that need neither JAX nor SPU. Prints one line per mutant: killed (and by
which test) or SURVIVED; exits 1 if any survived or no longer applies to the source.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants" / "named"
FAST = ["tests/test_mutation_killers.py", "tests/test_model.py", "tests/test_entropy.py", "tests/test_config.py",
        "tests/test_checkpoint.py", "tests/test_properties.py"]
RESUME = ["tests/test_mutation_killers.py", "tests/test_train.py::test_resume_keeps_a_best_checkpoint_newer_than_last"]


@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: list[str]


MUTANTS = [
    Mutant("lambda dropped from the loss", "src/piformer/model.py",
           "out.loss = out.ce_loss + reg.lam * out.reg_loss", "out.loss = out.ce_loss + out.reg_loss", FAST),
    Mutant("lambda fixed at its default in TrainConfig.reg_loss", "src/piformer/config.py",
           "return RegLoss(self.reg_lambda, ", "return RegLoss(1e-5, ", FAST),
    Mutant("lambda squared", "src/piformer/model.py",
           "out.loss = out.ce_loss + reg.lam * out.reg_loss", "out.loss = out.ce_loss + reg.lam ** 2 * out.reg_loss",
           FAST),
    Mutant("WN/SN group 'k' applied to V", "src/piformer/model.py",
           '"k": block.attn.k_proj', '"k": block.attn.v_proj', FAST),
    Mutant("reg_mode ignored (always the head form)", "src/piformer/model.py",
           'if reg.mode == "head":', "if True:", FAST),
    Mutant("reg_mode ignored (always the query form)", "src/piformer/model.py",
           'if reg.mode == "head":', "if False:", FAST),
    Mutant("resume forgets best_val_loss", "src/piformer/train.py",
           't.best_val, t.best_step = _best_so_far(state, rd.checkpoint_dir(out, rd.BEST))',
           't.best_val, t.best_step = float("inf"), None', RESUME),
    Mutant("resume takes best_val_loss from last only", "src/piformer/train.py",
           't.best_val, t.best_step = _best_so_far(state, rd.checkpoint_dir(out, rd.BEST))',
           't.best_val, t.best_step = float(state.get("best_val_loss", float("inf"))), state.get("best_step")', RESUME),
    Mutant("fold_static_norms folds in training mode", "src/piformer/model.py",
           "self.eval()  # spectral norm must not", "pass  # spectral norm must not", FAST),
    Mutant("ScFFN ignores beta", "src/piformer/model.py",
           "x = self.ffn_beta * x + f / self.ffn_alpha", "x = x + f / self.ffn_alpha", FAST),
    Mutant("ScFFN multiplies by alpha", "src/piformer/model.py",
           "x = self.ffn_beta * x + f / self.ffn_alpha", "x = self.ffn_beta * x + f * self.ffn_alpha", FAST),
    Mutant("temperature per head, not per query", "src/piformer/model.py",
           "q = q / self.temperature[:, :T].to(q.dtype).unsqueeze(-1)",
           "q = q / self.temperature[:, :T].mean(-1, keepdim=True).to(q.dtype).unsqueeze(-1)", FAST),
    Mutant("temperature multiplies instead of divides", "src/piformer/model.py",
           "q = q / self.temperature[:, :T].to(q.dtype).unsqueeze(-1)",
           "q = q * self.temperature[:, :T].to(q.dtype).unsqueeze(-1)", FAST),
]


def check(m: Mutant) -> str:
    work = WORK / re.sub(r"\W+", "_", m.name)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    path = work / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        return f"NOT APPLIED  {m.name}: {m.old!r} found {text.count(m.old)} times in {m.file}"
    path.write_text(text.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=str(work / "src"), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", r.stdout, flags=re.M)
    if r.returncode == 0:
        return f"SURVIVED     {m.name}"
    if not failed:
        return f"ERROR        {m.name}: pytest exit {r.returncode}\n{r.stdout[-1500:]}"
    return f"killed       {m.name}  by {failed[0]}"


def main(argv: list[str]) -> int:
    # --without FILE: leave a test file out (e.g. to see what the suite caught before it existed)
    without = [argv[i + 1] for i, a in enumerate(argv) if a == "--without"]
    argv = [a for i, a in enumerate(argv) if a != "--without" and (i == 0 or argv[i - 1] != "--without")]
    chosen = [m for m in MUTANTS if not argv or any(a in m.name for a in argv)]
    bad = 0
    for m in chosen:
        m.tests = [t for t in m.tests if t.split("::")[0] not in without]
        line = check(m)
        bad += not line.startswith("killed")
        print(line, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
