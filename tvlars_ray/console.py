"""What the terminal shows: plain-text tables, the way numbers are written in them, and
which log records reach it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Loggers whose records are Ray's business, not the user's: Ray's own (Tune, Train, core)
# and Python warnings (deprecations and the like, from any library).
NOISY_LOGGERS = ("ray", "py.warnings")


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


@contextlib.contextmanager
def quiet(log_file: Path) -> Iterator[None]:
    """While it lasts, Ray's log records, Python's warnings and whatever native code writes to
    this process's stderr (Ray's core worker logs errors there) go to ``log_file``; Python's
    own ``sys.stdout`` and ``sys.stderr`` keep the terminal, so the project's lines and errors
    still reach it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers[:] = [handler]
        lg.propagate = False
        lg.setLevel(min(lg.level or logging.INFO, logging.INFO))
    logging.captureWarnings(True)
    python_stderr = sys.stderr
    python_stderr.flush()
    terminal = os.dup(2)
    if _writes_to_fd2(python_stderr):  # keep Python's stderr on the terminal
        sys.stderr = open(terminal, "w", buffering=1, closefd=False)  # noqa: SIM115
    log_fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield
    finally:
        if sys.stderr is not python_stderr:
            sys.stderr.close()
            sys.stderr = python_stderr
        os.dup2(terminal, 2)
        os.close(terminal)
        logging.captureWarnings(False)
        for lg, (handlers, propagate, level) in zip(loggers, saved):
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
        handler.close()


def _writes_to_fd2(stream: Any) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test's capture object, say
        return False
