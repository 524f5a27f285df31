"""The README's results are the committed study's numbers: the section is generated from
results/cpu/results.json, and these tests render it again and read its numbers back."""

import json
import math
import re
from pathlib import Path

import pytest

from piformer.readme_results import config_rows, readme_section, render, update_readme

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "cpu" / "results.json"


@pytest.fixture(scope="module")
def committed():
    assert RESULTS.is_file(), "results/cpu/results.json is missing: the committed cpu study is part of the repo"
    return json.loads(RESULTS.read_text())


def test_readme_section_is_the_committed_study_rendered(committed):
    assert readme_section(REPO / "README.md") == render(committed, "cpu", "results/cpu")


def test_readme_numbers_equal_results_json(committed):
    """Independently of render(): every perplexity and verdict in the README's tables is the one
    results.json holds."""
    section = readme_section(REPO / "README.md")
    for run_group in config_rows(committed):
        line = next(x for x in section.splitlines() if x.startswith(f"| `{run_group['config']}` |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        ppl = [p for p in run_group["ppl"] if p is not None and math.isfinite(p)]
        if ppl:
            shown = float(re.match(r"[\d.]+", cells[3]).group())
            assert shown == pytest.approx(sum(ppl) / len(ppl), abs=0.006), run_group["config"]
        assert cells[1] == ", ".join(map(str, run_group["seeds"]))
    for f in committed["findings"]:
        assert f"| {f['id']} |" in section and f"**{f['verdict']}**" in section
    wall = committed["manifest"]["wall_s"] / 60
    assert f"**{wall:.0f} min**" in section
    assert wall <= 120, "the cpu tier must finish within 2 hours on 2 cores"


def _results(ppl_a: float, ppl_b: float) -> dict:
    def run(preset, seed, ppl):
        return {"label": f"{preset} seed={seed}", "preset": preset, "seed": seed, "variant": "",
                "status": {"status": "finished", "step": 10}, "eval": {"ppl": ppl},
                "entropy": {"head_entropy": [[1.0, 2.0], [0.5, 0.25]], "seq_len": 16}, "regulariser": None}

    return {
        "manifest": {"tier": {"name": "cpu", "note": "a note"}, "machine": "m", "versions": {"torch": "x"},
                     "started": "2026-11-30T23:00:00+00:00", "wall_s": 600},
        "runs": [run("SM+LN+G", 1, ppl_a), run("SM+LN+G", 2, ppl_b), run("SM", 1, 9.0)],
        "findings": [{"id": "F1", "claim": "c", "ours": "o", "verdict": "not reproduced"}],
    }


def test_render_pools_seeds_and_update_rewrites_only_the_section(tmp_path):
    text = render(_results(10.0, 12.0))
    assert "| `SM+LN+G` | 1, 2 | 2.69 | 11.00 (10.00–12.00) | 1.500 (1.500–1.500) | 0.375 (0.375–0.375)" in text
    assert "| `SM` | 1 | NaN (diverges) | 9.00 |" in text
    assert "| F1 | c | o | **not reproduced** |" in text and "**10 min**" in text
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n" + render(_results(1.0, 1.0)) + "\nafter\n")
    assert update_readme(readme, _results(10.0, 12.0))
    new = readme.read_text()
    assert new.startswith("# x\n\nbefore\n") and new.endswith("\nafter\n")
    assert readme_section(readme) == render(_results(10.0, 12.0))
    assert not update_readme(readme, _results(10.0, 12.0))  # already up to date
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="no results section"):
        update_readme(tmp_path / "plain.md", _results(1.0, 1.0))
