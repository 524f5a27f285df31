import numpy as np
import pytest
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from piformer.report_doc import Document, Figure, Heading, Para, Table
from browser import chromium, probe


def _doc(tmp_path):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(np.arange(10), np.arange(10) ** 2)
    fig.savefig(tmp_path / "f.png")
    plt.close(fig)
    return Document("t", [Heading("h"), Para("see `x|y`"), Table(["a", "b"], [["1", "x|y"]]), Figure(tmp_path / "f.png", "cap")])


def test_markdown_links_figures_and_escapes_cells(tmp_path):
    md = _doc(tmp_path).to_markdown(tmp_path)
    assert "![cap](f.png)" in md and "| 1 | x\\|y |" in md and "## h" in md


def test_html_is_self_contained(tmp_path):
    html = _doc(tmp_path).to_html()
    assert "data:image/png;base64," in html and "f.png" not in html
    assert "<code>x|y</code>" in html


@pytest.mark.skipif(chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_html_renders_in_a_real_browser(tmp_path):
    (tmp_path / "r.html").write_text(_doc(tmp_path).to_html())
    seen = probe(tmp_path / "r.html")
    assert seen["errors"] == [] and seen["broken"] == []
    assert seen["images"] == 1 and seen["widths"][0] > 100 and seen["tables"] == 1
