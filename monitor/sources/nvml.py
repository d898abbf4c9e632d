"""NVML source: runs the NVML worker process and passes its events on.

NVML is a vendor library loaded into whatever process calls it, and a crash in it (a segfault, an
abort) would end that process. So the daemon never loads it: ``monitor/sources/nvml_worker.py``
does, in a child process. This side tells the worker which GPUs to watch (the core's
``nvml_targets``: the NVIDIA devices udev shows bound to the ``nvidia`` driver, and which of them a
PCI recovery reset), reads the events it writes, and if it dies, marks those GPUs "NVML worker
crashed" and starts a new one. It also ends the wait of a GPU that NVML has not named in time.

A GPU is read again when udev reports it added or rebound, and after the evidence of a reset
(a recovery that cleared its problems), never on a timer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

import trio

from monitor.core.events import Event, NvmlAbsent, NvmlNameWaitOver, NvmlUnreachable
from monitor.core.rules.nvidia import nvml_targets
from monitor.core.state import State
from monitor.sources.nvml_worker import EXIT_NO_NVML, decode_event
from monitor.wire.framing import LineBuffer

log = logging.getLogger(__name__)

Send = trio.MemorySendChannel[tuple[Event, ...]]
Changes = Callable[[], AsyncIterator[State]]  # the state now and after each change of it
# After the worker died: at once the first time, then less and less often while it keeps dying.
RESTART_DELAYS = (1.0, 60.0)  # the first, and the most
STOP_SECONDS = 1.0  # for the worker to shut NVML down once its stdin ends


async def _tell_targets(
    stdin: trio.abc.SendStream, states: AsyncIterator[State], watched: set[str]
) -> None:
    """Write the GPUs to watch whenever they change, and those a PCI recovery reset."""
    told: dict[str, int] | None = None
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # it died
        async for state in states:
            targets = nvml_targets(state)
            if targets == told:
                continue
            reset = sorted(a for a, n in targets.items() if told and told.get(a, n) != n)
            line = json.dumps({"watch": sorted(targets), "reset": reset}).encode() + b"\n"
            await stdin.send_all(line)
            told = targets
            watched.clear()
            watched.update(targets)


async def end_name_waits(changes: Changes, send: Send, deadline: float) -> None:
    """Once a GPU has waited ``deadline`` for NVML to name it, say so: it is then shown under
    the database's name (``monitor.core.rules.nvidia``)."""

    async def wait_over(address: str, wait: int) -> None:
        await trio.sleep(deadline)
        await send.send((NvmlNameWaitOver(address, wait),))

    timed: set[tuple[str, int]] = set()
    async with trio.open_nursery() as nursery:
        async for state in changes():
            for address, wait in state.naming.items():
                if (address, wait) not in timed:
                    timed.add((address, wait))
                    nursery.start_soon(wait_over, address, wait)
            timed &= set(state.naming.items())


async def _pass_events(stdout: trio.abc.ReceiveStream, send: Send) -> None:
    """Send on each batch of events the worker writes, until its stdout ends."""
    buffer = LineBuffer()
    while data := await stdout.receive_some(1 << 16):
        events = []
        for line in buffer.feed(data):
            try:
                events.append(decode_event(line))
            except ValueError as exc:
                log.error("ignoring a line from the NVML worker: %s", exc)
        if events:
            await send.send(tuple(events))


async def run_worker(command: list[str], send: Send, changes: Changes, watched: set[str]) -> int:
    """Run one NVML worker until it exits; its exit status (negative: killed by that signal)."""
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tell_targets, process.stdin, changes(), watched)
            await _pass_events(process.stdout, send)  # its stdout ends when it does
            nursery.cancel_scope.cancel()
        return await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await process.stdin.aclose()  # the worker's cue to let NVML go and exit
            with trio.move_on_after(STOP_SECONDS):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def _death(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


async def run_nvml_source(
    send: Send,
    changes: Changes,
    *,
    deadline: float = 5.0,
    log_level: str = "info",
    log_target: str = "auto",
) -> None:
    """Keep an NVML worker running; without NVML, it says so once and this returns."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(end_name_waits, changes, send, deadline)
        await _keep_worker(send, changes, deadline, log_level, log_target)
        nursery.cancel_scope.cancel()


async def _keep_worker(
    send: Send, changes: Changes, deadline: float, log_level: str, log_target: str
) -> None:
    command = [sys.executable, "-m", "monitor.sources.nvml_worker", "--deadline", str(deadline)]
    command += ["--log-level", log_level, "--log-target", log_target]
    delay = RESTART_DELAYS[0]
    while True:
        watched: set[str] = set()
        started = trio.current_time()
        status = await run_worker(command, send, changes, watched)
        if status == EXIT_NO_NVML:
            await send.send((NvmlAbsent(),))
            return
        if trio.current_time() - started > RESTART_DELAYS[1]:
            delay = RESTART_DELAYS[0]  # it ran well for a while: this is a new failure
        reason = f"NVML worker crashed ({_death(status)}); restarting it"
        log.critical("%s in %g s", reason, delay)
        if watched:
            await send.send(tuple(NvmlUnreachable(a, reason) for a in sorted(watched)))
        await trio.sleep(delay)
        delay = min(delay * 2, RESTART_DELAYS[1])
