"""Tables for people: aligned plain text for the terminal and GitHub Markdown, from one list of
headers and rows of already formatted cells. Numbers are right-aligned, text left-aligned."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?$", re.IGNORECASE)


def _is_numeric_column(rows: list[list[str]], col: int) -> bool:
    cells = [r[col] for r in rows if r[col] not in ("", "-")]
    return bool(cells) and all(_NUMBER.match(c) for c in cells)


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, a dashed rule under the headers."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    numeric = [_is_numeric_column(rows, i) for i in range(len(headers))]

    def line(cells):
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table; numeric columns right-aligned, '|' in cells escaped."""
    numeric = [_is_numeric_column(rows, i) for i in range(len(headers))]

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    return "\n".join([line(headers), align] + [line(r) for r in rows])
