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
