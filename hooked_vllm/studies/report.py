"""A study's report: one self-contained HTML page (figures inlined as SVG, no script, no network),
written atomically; the same figures as PNG beside it. Matplotlib draws them (no browser needed).

Example:
    >>> html = page("a study", [section("Result", paragraph("text"))])
    >>> html.startswith("<!DOCTYPE html>")
    True
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from hooked_vllm.runs.files import atomic_path, write_text_atomically

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.theirs { background: #f7f4ea; } .note { color: #555; font-size: 0.92em; }
.warning { background: #fff0f0; border: 1px solid #d88; padding: 0.5em 0.8em; }
figure { margin: 0.8em 0; } figure svg { max-width: 100%; height: auto; }
"""


def escape(text: object) -> str:
    return html.escape(str(text))


def paragraph(text: str, css: str | None = None) -> str:
    return f"<p{f' class={css!r}' if css else ''}>{escape(text)}</p>"


def section(title: str, *parts: str, id: str | None = None) -> str:
    return f"<section{f' id={id!r}' if id else ''}><h2>{escape(title)}</h2>{''.join(parts)}</section>"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], css: str | None = None) -> str:
    """An HTML table; numbers are right-aligned (floats to 3 significant digits, None as an empty cell)."""

    def cell(value: object) -> str:
        if value is None:
            return "<td></td>"
        if isinstance(value, float):
            return f'<td class="num">{value:.3g}</td>'
        if isinstance(value, int) and not isinstance(value, bool):
            return f'<td class="num">{value}</td>'
        return f"<td>{escape(value)}</td>"

    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(cell(v) for v in row)}</tr>" for row in rows)
    opening = f"<table class={css!r}>" if css else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def parameters_table(params: dict, n_layers: int) -> str:
    """The study's parameters as a two-column table (lists joined by commas), then the model's blocks."""
    rows = [
        [key, ", ".join(map(str, value)) if isinstance(value, list) else str(value)]
        for key, value in params.items()
    ]
    return table(["parameter", "value"], [*rows, ["model blocks", n_layers]])


def figure(fig, caption: str, name: str) -> str:
    """A matplotlib figure as inline SVG (its ``id`` is ``name``) with a caption."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :].replace("<svg", f'<svg id="{escape(name)}"', 1)
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def save_png(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def page(title: str, sections: Sequence[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )


def write_page(path: Path, title: str, sections: Sequence[str]) -> Path:
    write_text_atomically(path, page(title, sections))
    return path
