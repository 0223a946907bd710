"""The report as Markdown (figures as PNG files next to it) and as one self-contained HTML page (figures
embedded as base64 PNG data URIs), both from the same list of sections."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from raysdpb.report.tables import Table

__all__ = ["Figure", "Section", "to_markdown", "to_html"]


@dataclass
class Figure:
    path: Path          # the PNG, in the report folder
    caption: str


Block = Union[str, Table, Figure]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


# --- Markdown -----------------------------------------------------------------------------------------------

def _md_cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if bold and text else text


def _md_table(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(c, False) for c in table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    for i, row in enumerate(table.rows):
        lines.append("| " + " | ".join(_md_cell(c, (i, j) in table.bold) for j, c in enumerate(row)) + " |")
    return "\n".join(lines)


def to_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append(_md_table(block))
            elif isinstance(block, Figure):
                parts.append(f"![{block.path.stem}]({block.path.name})\n\n*{block.caption}*")
            else:
                parts.append(block)
    return "\n\n".join(parts) + "\n"


# --- HTML --------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td strong { color: #000; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; margin-top: 0.3em; }
code { background: #f4f4f4; padding: 0 0.25em; border-radius: 3px; }
"""


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the report's sentences use: `code` and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = []
    for i, row in enumerate(table.rows):
        cells = []
        for j, cell in enumerate(row):
            text = html.escape(cell)
            cells.append(f"<td><strong>{text}</strong></td>" if (i, j) in table.bold else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _html_figure(figure: Figure) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    caption = _inline(figure.caption)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(figure.path.stem)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _html_text(text: str) -> str:
    lines = text.splitlines()
    if lines and all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return f"<p>{_inline(text)}</p>"


def to_html(title: str, sections: list[Section]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append(_html_table(block))
            elif isinstance(block, Figure):
                parts.append(_html_figure(block))
            else:
                parts.append(_html_text(block))
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
