import numpy as np
import pytest
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from piformer.report_doc import Document, Figure, Heading, Para, Table, plain_text
from browser import chromium, probe, raw_markup

WIDE = [f"column number {i}" for i in range(40)]


def _doc(tmp_path):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(np.arange(10), np.arange(10) ** 2)
    fig.savefig(tmp_path / "f.png")
    plt.close(fig)
    return Document("report — tier `quick`", [
        Heading("h with `code`"),
        Para("see `x|y`; **Smoke view.** and *Entropy-Guided Attention*, a [link](https://example.org); 3 < 4"),
        Table(["a", "b"], [["1", "x|y"], ["`SM+LN+G`", "**bold** cell"]], caption="*caption* with `code`"),
        Table(WIDE, [[f"{i}.000000" for i in range(40)]]),
        Figure(tmp_path / "f.png", "What to see: the *curve* bends at `x=3`."),
    ])


def test_markdown_links_figures_and_escapes_cells(tmp_path):
    md = _doc(tmp_path).to_markdown(tmp_path)
    assert "![What to see: the *curve* bends at `x=3`.](f.png)" in md
    assert "| 1 | x\\|y |" in md and "## h with `code`" in md


def test_html_is_self_contained(tmp_path):
    html = _doc(tmp_path).to_html()
    assert "data:image/png;base64," in html and "f.png" not in html
    assert "<code>x|y</code>" in html


def test_html_renders_inline_markdown_not_literal_markup(tmp_path):
    html = _doc(tmp_path).to_html()
    assert "<strong>Smoke view.</strong>" in html and "<em>Entropy-Guided Attention</em>" in html
    assert '<a href="https://example.org">link</a>' in html
    assert "<h1>report — tier <code>quick</code></h1>" in html and "<title>report — tier quick</title>" in html
    assert "<caption><em>caption</em> with <code>code</code></caption>" in html
    assert "<td><strong>bold</strong> cell</td>" in html
    assert "3 &lt; 4" in html  # raw HTML is escaped, not interpreted
    assert 'alt="What to see: the curve bends at x=3."' in html  # alt text carries no markup
    assert html.count('<div class="table-wrap">') == 2


def test_plain_text_drops_markup():
    assert plain_text("**a** *b* `c` [d](http://e)") == "a b c d"


def test_raw_markup_detector_finds_what_a_renderer_left():
    assert raw_markup("**Smoke view.** the `cpu` tier, *emphasis*") == ["**", "**", "`", "`", "*emphasis*"]
    assert raw_markup("lambda x penalty, 2 * 3, a*b, 5 *") == []


@pytest.mark.skipif(chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_html_renders_in_a_real_browser(tmp_path):
    (tmp_path / "r.html").write_text(_doc(tmp_path).to_html())
    seen = probe(tmp_path / "r.html")
    assert seen["errors"] == [] and seen["broken"] == []
    assert seen["images"] == 1 and seen["widths"][0] > 100 and seen["tables"] == 2
    assert raw_markup(seen["text"]) == [], seen["text"]
    assert "Smoke view." in seen["text"] and "column number 39" in seen["text"]
    assert seen["overflowing"] == 0  # the 40-column table scrolls in its box


# ---------------------------------------------------------------------------------------
# the committed cpu study's report, rebuilt from its run files


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    import shutil
    import subprocess
    from pathlib import Path

    from piformer.report import build

    repo = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files", "results/cpu"], cwd=repo, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("results/cpu is not in this checkout")
    root = tmp_path_factory.mktemp("cpu")
    for rel in files:
        dst = root / Path(rel).relative_to("results/cpu")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / rel, dst)
    figures = {p.stem: f"figures/{p.name}" for p in (root / "figures").glob("*.png")}
    return build(root, figures={"loss": figures["loss_curves"], "heatmap": figures["entropy_heatmap"],
                                "temperatures": figures["temperatures"]})


def test_cpu_report_what_was_run_is_a_table_not_json(cpu_report):
    md = cpu_report["md"].read_text()
    section = md[md.index("## What was run"):md.index("## Perplexity")]
    assert "{" not in section and "| `train.max_steps` | 800 | Optimizer steps to train for. |" in section
    assert "## Training" in md and "](figures/loss_curves.png)" in md
    # the raw-temperature run's negative temperatures are explained beside the figure
    assert "t=raw` (" in md and "lets t cross zero" in md


@pytest.mark.skipif(chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_cpu_report_in_a_real_browser_shows_no_markup(cpu_report):
    seen = probe(cpu_report["html"])
    assert seen["errors"] == [] and seen["broken"] == [] and seen["images"] == 3
    assert raw_markup(seen["text"]) == []
    assert seen["overflowing"] == 0 and seen["tables"] >= 8
    assert "train.max_steps" in seen["text"] and "Temperatures at or below zero" in seen["text"]
