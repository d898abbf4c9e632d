"""Holder processes read from this host's /proc: only "no such process" ends a lease."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from monitor.sources import holders


def test_a_living_holder_runs_and_an_exited_one_does_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = holders.identify(child.pid)
        assert holders.is_running(holder)
    finally:
        child.kill()
        child.wait()
    assert not holders.is_running(holder)


def test_a_failure_that_says_nothing_of_the_holder_is_raised_not_read_as_exited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder = holders.identify(os.getpid())

    def out_of_descriptors(pid: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pidfd_open", out_of_descriptors)
    with pytest.raises(OSError, match="Too many open files"):
        holders.is_running(holder)

    def gone(pid: int) -> int:
        raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH))

    monkeypatch.setattr(os, "pidfd_open", gone)
    assert not holders.is_running(holder)
