"""The line every benchmark prints for each figure it measures, read by ``bench/summary.py``.

    BENCH name=optim_step.tvlars_vs_sgd value=1.412 unit=x target=<=1.6

``name`` is ``<script>.<figure>``; ``target`` (``<=X`` or ``>=X``) is absent for a figure
shown for information only. A script judges nothing itself for the summary: the summary
compares value and target, so a script cannot pass a figure it did not print.
"""

from __future__ import annotations

import math

PREFIX = "BENCH"


def emit(name: str, value: float, unit: str, *, at_most: float | None = None,
         at_least: float | None = None) -> str:
    """Print (and return) one figure's line; ``at_most`` / ``at_least`` give its target."""
    if at_most is not None and at_least is not None:
        raise ValueError("a figure has one target: at_most or at_least")
    if any(c.isspace() or c == "=" for c in name + unit):
        raise ValueError(f"name and unit may hold no spaces or '=': {name!r} {unit!r}")
    shown = f"{value:.4g}" if math.isfinite(value) else "nan"
    line = f"{PREFIX} name={name} value={shown} unit={unit}"
    if at_most is not None:
        line += f" target=<={at_most:g}"
    elif at_least is not None:
        line += f" target=>={at_least:g}"
    print(line, flush=True)
    return line
