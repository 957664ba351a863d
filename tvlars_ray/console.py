"""What the terminal shows: plain-text tables and the way numbers are written in them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]], rule: bool = False) -> str:
    """Columns padded to their widest cell, two spaces apart; ``rule`` underlines the header."""
    cells = [[str(x) for x in header], *([str(x) for x in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in cells]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pct(value: Any) -> str:
    """A fraction as a percentage with two decimals; ``-`` for a missing or NaN value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "-"
    return f"{100 * value:.2f}%"


def fmt(value: Any) -> str:
    """A setting's value as a user wrote it: ``1e-05``, not ``1.0000000000000001e-05``."""
    return f"{value:g}" if isinstance(value, float) else str(value)
