"""py-spy attached to the daemon while a scenario loads it (``--profile``): the functions that
take its busy time, by own time (leaf frames) and by inclusive time. Samples where the daemon
waits in epoll are left out; samples in other system calls (file checks, socket writes) count,
which py-spy's ``--gil`` mode would drop because those calls release the GIL. A garbage
collection is charged to the frame whose allocation set it off."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

PY_SPY = Path(sys.executable).with_name("py-spy")
# Leaf frames of a daemon waiting for work, not doing it: trio's epoll wait, and its idle
# worker threads (a thread doing work has deeper frames).
WAITING = (
    "EpollIOManager.get_events (trio/_core/_io_epoll.py)",
    "EpollIOManager._epoll_wait (trio/_core/_io_epoll.py)",
    "WorkerThread._work (trio/_core/_thread_cache.py)",
)


class PySpy:
    """``py-spy record --pid PID --format raw`` for the duration of a ``with`` block."""

    def __init__(self, pid: int, output: Path, rate: int = 1000, nonblocking: bool = False) -> None:
        self.output = output
        # Blocking (the default) pauses the daemon for each sample: whole stacks, slower daemon.
        # Non-blocking leaves its speed alone (for storms, where speed decides what it reads);
        # a few stacks may then come out torn.
        command = [
            str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--output", str(output),
            "--rate", str(rate), "--nolineno", *(["--nonblocking"] if nonblocking else []),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def __enter__(self) -> PySpy:
        return self

    def __exit__(self, *exc: object) -> None:
        # SIGINT makes py-spy stop sampling and write its file.
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def summary(self, top: int = 12) -> dict[str, Any]:
        return summarize(self.output.read_text(), top)


def summarize(raw: str, top: int = 12) -> dict[str, Any]:
    """Own and inclusive shares of the sampled (non-idle) time, per function."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames or frames[-1].startswith(WAITING):
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def shares(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(n / total, 4)) for name, n in counter.most_common(top)]

    return {"samples": total, "own": shares(own), "inclusive": shares(inclusive)}


def print_summary(title: str, summary: dict[str, Any]) -> None:
    print(f"\nprofile: {title} ({summary['samples']} busy samples, at up to 1 kHz)")
    print("  own time (leaf frame):")
    for name, share in summary["own"]:
        print(f"    {share * 100:5.1f}%  {name}")
    print("  inclusive time:")
    for name, share in summary["inclusive"]:
        print(f"    {share * 100:5.1f}%  {name}")
