"""``hotplug-monitor explain-xid N``, and the XID table of docs/nvidia-health.md, both from the
core's catalog and verdict function, so neither can drift from what the daemon does.

``python -m monitor.cli.xid_table`` rewrites the table between the page's markers; a test
checks the committed page matches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monitor.core.xid_catalog import CATALOG_REVISION
from monitor.core.xids import CATALOG, XidPolicy, judge

BEGIN = "<!-- xid-table: python -m monitor.cli.xid_table -->"
END = "<!-- /xid-table -->"
DOCS_PAGE = "docs/nvidia-health.md"  # relative to the repository root


def explain(xid: int, policy: XidPolicy | None = None) -> str:
    """What the daemon does with ``xid`` under ``policy`` (the defaults when None)."""
    verdict = judge(xid, policy or XidPolicy())
    entry = CATALOG.get(xid)
    lines = [
        f"XID {xid}: {entry.mnemonic or '(unnamed)'}: {entry.meaning}"
        if entry
        else f"XID {xid}: not in NVIDIA's XID catalog",
        f"catalog action: {verdict.action}",
        f"verdict: {verdict.health}"
        + (f" (recovery: {verdict.recovery_action})" if verdict.fatal else ""),
        f"decided by: {verdict.decided_by}",
        f"health_desc: {verdict.desc}",
        "A recovery action the driver reports (other than NONE) decides over the catalog.",
    ]
    return "\n".join(lines) + "\n"


def table() -> str:
    rows = [
        f"Generated from {CATALOG_REVISION} (monitor/core/xid_catalog.py), default policy.",
        "",
        "| XID | mnemonic | meaning | NVIDIA's action | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for xid, entry in sorted(CATALOG.items()):
        verdict = judge(xid, XidPolicy())
        rows.append(
            f"| {xid} | `{entry.mnemonic}` | {entry.meaning} | {entry.action} | {verdict.health} |"
        )
    return "\n".join(rows) + "\n"


def with_table(readme: str) -> str:
    head, rest = readme.split(BEGIN + "\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Rewrite the XID table of {DOCS_PAGE}.")
    parser.add_argument("page", nargs="?", type=Path, default=Path(DOCS_PAGE))
    args = parser.parse_args(argv)
    args.page.write_text(with_table(args.page.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
