"""Run the benchmarks and print one table of their figures against their targets.

Each benchmark is a script in ``bench/`` (a name not starting with ``_``) that prints its
figures as ``BENCH name=... value=... unit=... [target=<=X | >=X]`` lines
(``bench/_figures.py``); a new benchmark plugs in by being such a script. The scripts run one
after the other with this interpreter, their output shown as it comes; then the table: each
figure, its target, and PASS / FAIL (``-`` for a figure shown for information). A script that
fails without a failed figure to show for it (a crash) is a FAIL row of its own.

    python bench/summary.py                      # every benchmark in bench/
    python bench/summary.py bench/optim_step.py  # some of them

Exit status 1 if any row fails.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _figures import PREFIX

HERE = Path(__file__).resolve().parent
FIELD = re.compile(r"(\w+)=(\S+)")


@dataclass
class Row:
    name: str
    value: str
    unit: str = ""
    target: str = ""
    verdict: str = "-"


def judge(value: str, target: str) -> str:
    """PASS / FAIL of ``value`` against ``<=X`` or ``>=X``; '-' without a target."""
    if not target:
        return "-"
    try:
        number, bound = float(value), float(target[2:])
    except ValueError:
        return "FAIL"
    ok = number <= bound if target.startswith("<=") else number >= bound
    return "PASS" if ok else "FAIL"


def parse(line: str) -> Row | None:
    """A row from one ``BENCH`` line; None for any other line."""
    if not line.startswith(PREFIX + " "):
        return None
    fields = dict(FIELD.findall(line))
    if "name" not in fields or "value" not in fields:
        return None
    target = fields.get("target", "")
    if target and target[:2] not in ("<=", ">="):
        target = ""
    return Row(fields["name"], fields["value"], fields.get("unit", ""), target,
               judge(fields["value"], target))


def run(script: Path) -> tuple[list[Row], int, float]:
    """Run one benchmark, echoing its output; its rows, exit status and wall time."""
    print(f"\n######## {script.name}", flush=True)
    start = time.perf_counter()
    rows: list[Row] = []
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            row = parse(line.strip())
            if row is not None:
                rows.append(row)
    return rows, proc.returncode, time.perf_counter() - start


def table(rows: list[Row]) -> str:
    header = ("figure", "measured", "target", "result")
    cells = [header] + [(r.name, f"{r.value} {r.unit}".strip(),
                         f"{r.target} {r.unit}".strip() if r.target else "-", r.verdict)
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scripts", nargs="*", type=Path,
                        help="benchmarks to run (default: every bench/*.py but this one)")
    args = parser.parse_args(argv)
    scripts = args.scripts or sorted(
        p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "summary.py")
    rows: list[Row] = []
    for script in scripts:
        if not script.is_file():
            print(f"error: no benchmark {script}", file=sys.stderr)
            return 2
        found, status, wall = run(script)
        rows.extend(found)
        if status != 0 and not any(r.verdict == "FAIL" for r in found):
            rows.append(Row(f"{script.stem} (exit status)", str(status), target="==0",
                            verdict="FAIL"))
        print(f"######## {script.name}: exit {status}, {wall:.0f} s", flush=True)
    print("\n" + table(rows))
    failed = sum(r.verdict == "FAIL" for r in rows)
    judged = sum(r.verdict != "-" for r in rows)
    print(f"\n{judged - failed} of {judged} targets met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
