"""The "Reliability" table of docs/operating.md, written by the tests that measure it.

A test calls ``record`` once its assertions have passed, so a row is what held in that run. At the
end of the session conftest writes the rows to ``build/reliability.json`` (or
``$RELIABILITY_REPORT``) and prints them; ``python -m tests.reliability --readme
docs/operating.md`` puts them there between the markers, so the table there is the output of a
run and not prose.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPORT = ROOT / "build" / "reliability.json"
START = "<!-- reliability table: python -m tests.reliability -->"
END = "<!-- end of reliability table -->"

AREAS = ["Protocol", "Resources", "Faults", "Device data", "Security"]  # the table's order

rows: list[dict[str, str]] = []


def record(area: str, what: str, tried: str, outcome: str) -> None:
    """One row: in ``area`` (one of AREAS), ``what`` was done, ``tried`` (how many, how hard),
    and the ``outcome`` that held."""
    assert area in AREAS, area
    rows.append({"area": area, "what": what, "tried": tried, "outcome": outcome})


def report_path() -> Path:
    return Path(os.environ.get("RELIABILITY_REPORT", DEFAULT_REPORT))


def write(path: Path, header: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(report: dict[str, Any]) -> str:
    lines = [
        f"Measured by `{report['command']}` on {report['date']} ({report['host']}).",
        "",
        "| Area | Fault or input | Tried | Outcome |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {_cell(r['area'])} | {_cell(r['what'])} | {_cell(r['tried'])} | {_cell(r['outcome'])} |"
        for r in sorted(report["rows"], key=lambda r: AREAS.index(r["area"]))
    ]
    return "\n".join(lines)


def update_readme(readme: Path, report: dict[str, Any]) -> None:
    text = readme.read_text()
    before, found, rest = text.partition(START)
    _, found_end, after = rest.partition(END)
    if not found or not found_end:
        raise SystemExit(f"{readme} has no reliability markers ({START} ... {END})")
    readme.write_text(f"{before}{START}\n{table(report)}\n{END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Print the reliability table of the last test run, or put it in a page."
    )
    parser.add_argument("--report", type=Path, default=report_path(), help="the run's JSON")
    parser.add_argument("--readme", type=Path, help="rewrite the table in this page")
    args = parser.parse_args()
    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"no reliability report at {args.report} ({exc}); run the tests first")
    if args.readme:
        update_readme(args.readme, report)
    else:
        print(table(report))


if __name__ == "__main__":
    main()
