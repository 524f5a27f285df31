"""Open an HTML file in headless Chromium and report what a reader would see: load errors,
images that fail to decode, the visible text, and tables that overflow the page. Used by the report tests; skipped where Chromium is not installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  // After 'load' every image has been fetched and decoded, or has failed.
  const imgs = Array.from(document.images);
  const out = {images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
               widths: imgs.map(i => i.naturalWidth), errors: window.__errors,
               tables: document.querySelectorAll('table').length, title: document.title,
               text: document.body.innerText,
               // tables wider than the page must sit in a box that scrolls instead of overflowing it
               overflowing: Array.from(document.querySelectorAll('table')).filter(t => {
                 const box = t.parentElement;
                 const scrolls = getComputedStyle(box).overflowX === 'auto' || getComputedStyle(box).overflowX === 'scroll';
                 return t.getBoundingClientRect().right > document.body.getBoundingClientRect().right + 1 && !scrolls;
               }).length};
  const pre = document.createElement('pre'); pre.id = '__probe';
  pre.textContent = 'PRO' + 'BE' + JSON.stringify(out) + 'EBO' + 'RP';  // split so the source never matches
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def probe(html_path: Path, timeout: float = 60.0) -> dict:
    """Load `html_path` (with a probe script appended to a copy) and return what the probe saw."""
    exe = chromium()
    assert exe, "chromium not installed"
    text = Path(html_path).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(text.replace("</head>", _PROBE + "</head>", 1))
        cmd = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp}/profile", "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r"PROBE(.*?)EBORP", proc.stdout, re.S)
    assert m, f"the page did not finish loading; chromium said: {proc.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


# Markdown a renderer left as text: bold/strong markers, code backticks, or *emphasis* around a word.
_RAW_MARKUP = re.compile(r"\*\*|`|(?<![\w*])\*(?=\S)[^*\n]+?(?<=\S)\*(?![\w*])")


def raw_markup(text: str) -> list[str]:
    """The pieces of literal Markdown markup in a page's visible text (empty when none)."""
    return _RAW_MARKUP.findall(text)
