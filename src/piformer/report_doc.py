"""A tiny document model rendered twice: Markdown (figures linked) and one self-contained HTML
file (figures embedded as data URIs). The report builds a list of blocks; this module only renders.

Text in blocks is Markdown (`code`, *emphasis*, **strong**, [links](url)). The Markdown output
keeps it as is; the HTML output renders it with markdown-it-py, a CommonMark parser, with raw HTML
disabled (so a `<` in a number or a path is shown, never interpreted).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

_MD = MarkdownIt("commonmark", {"html": False})

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    """Markdown: inline markup, and blank-line separated paragraphs or lists."""


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str
    """Markdown; one sentence saying what the figure shows and what to look for."""


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> "Document":
        self.blocks.extend(blocks)
        return self

    # -- Markdown ----------------------------------------------------------------------
    def to_markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if isinstance(b, Heading):
                out += ["#" * b.level + " " + b.text, ""]
            elif isinstance(b, Para):
                out += [b.text, ""]
            elif isinstance(b, Table):
                if b.caption:
                    out += [f"*{b.caption}*", ""]
                out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
                out.append("|" + "---|" * len(b.header))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
            elif isinstance(b, Figure):
                rel = _relative(b.path, base)
                out += [f"![{b.caption}]({rel})", "", f"*{b.caption}*", ""]
        return "\n".join(out)

    # -- HTML --------------------------------------------------------------------------
    def to_html(self) -> str:
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(plain_text(self.title))}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{_inline(self.title)}</h1>",
        ]
        for b in self.blocks:
            if isinstance(b, Heading):
                parts.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
            elif isinstance(b, Para):
                parts.append(_MD.render(str(b.text)).strip())
            elif isinstance(b, Table):
                cap = f"<caption>{_inline(b.caption)}</caption>" if b.caption else ""
                head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
                body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in b.rows)
                # A table wider than the page scrolls sideways in its own box instead of overflowing it.
                parts.append(f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead>'
                             f"<tbody>{body}</tbody></table></div>")
            elif isinstance(b, Figure):
                data = base64.b64encode(Path(b.path).read_bytes()).decode("ascii")
                mime = "image/svg+xml" if str(b.path).endswith(".svg") else "image/png"
                parts.append(
                    f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(plain_text(b.caption))}">'
                    f"<figcaption>{_inline(b.caption)}</figcaption></figure>"
                )
        parts.append("</body></html>")
        return "\n".join(parts)


def fmt(x: Any, spec: str = ".3f", none: str = "—") -> str:
    """A number for a table cell or sentence; `none` for a missing or non-finite one."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    """One line of Markdown as HTML (no enclosing paragraph)."""
    return _MD.renderInline(str(text))


def plain_text(text: str) -> str:
    """One line of Markdown as the text a reader sees, for places that take no markup
    (the page title, an image's alt text)."""
    out = []
    for block in _MD.parseInline(str(text)):
        for tok in block.children or []:
            if tok.type in ("text", "code_inline"):
                out.append(tok.content)
            elif tok.type in ("softbreak", "hardbreak"):
                out.append(" ")
    return "".join(out)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
.table-wrap { overflow-x: auto; margin: 1em 0; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child, td.text { text-align: left; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 4px; }
figure { margin: 1.5em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-style: italic; color: #555; } code { background: #f5f5f5; padding: 0 3px; }
"""


def _cell(text: str) -> str:
    """A table cell: numbers align right, prose (more than a few words) left."""
    prose = len(str(text).split()) > 4
    return f'<td class="text">{_inline(text)}</td>' if prose else f"<td>{_inline(text)}</td>"
