"""NVML source: runs the NVML worker process and passes its events on.

NVML is a vendor library loaded into whatever process calls it, and a crash in it (a segfault, an
abort) would end that process. So the daemon never loads it: ``monitor/sources/nvml_worker.py``
does, in a child process. This side tells the worker which GPUs to watch (the NVIDIA devices
udev shows bound to the ``nvidia`` driver, and which of them a PCI recovery reset), reads the
events it writes, and if it dies, marks those GPUs "NVML worker crashed" and starts a new one.

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

import trio

from monitor.core.events import Event, NvmlUnreachable
from monitor.core.health import CAUSE_PCI_ERROR
from monitor.core.reducer import State
from monitor.engine.hub import Hub
from monitor.sources.nvml_worker import EXIT_NO_NVML, decode_event
from monitor.wire.protocol import LineBuffer

log = logging.getLogger(__name__)

Send = trio.MemorySendChannel[tuple[Event, ...]]

NVIDIA_VENDOR_ID = 0x10DE
# After the worker died: at once the first time, then less and less often while it keeps dying.
RESTART_DELAYS = (1.0, 60.0)  # the first, and the most
STOP_SECONDS = 1.0  # for the worker to shut NVML down once its stdin ends


def nvidia_gpus(state: State) -> set[str]:
    """The NVIDIA devices we show, bound to the nvidia driver."""
    shown = state.fingerprint.devices()
    return {
        address
        for address, facts in state.devices.items()
        if facts.vendor_id == NVIDIA_VENDOR_ID and facts.driver == "nvidia" and address in shown
    }


def _pci_errors(state: State) -> set[str]:
    return {a for a, causes in state.problems.items() if CAUSE_PCI_ERROR in causes}


async def _tell_targets(stdin: trio.abc.SendStream, hub: Hub, watched: set[str]) -> None:
    """Write the GPUs to watch whenever they change, and those a PCI recovery reset."""
    pci_errors: set[str] = set()
    told: set[str] | None = None
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # it died
        while True:
            published = hub.published
            state = hub.state
            watch = nvidia_gpus(state)
            before, pci_errors = pci_errors, _pci_errors(state)
            reset = {a for a in watch if a in before and a not in pci_errors}
            if watch != told or reset:
                line = json.dumps({"watch": sorted(watch), "reset": sorted(reset)}).encode() + b"\n"
                await stdin.send_all(line)
                told = watch
                watched.clear()
                watched.update(watch)
            await published.wait()


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


async def run_worker(command: list[str], send: Send, hub: Hub, watched: set[str]) -> int:
    """Run one NVML worker until it exits; its exit status (negative: killed by that signal)."""
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tell_targets, process.stdin, hub, watched)
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
    hub: Hub,
    *,
    deadline: float = 5.0,
    log_level: str = "info",
    log_target: str = "auto",
) -> None:
    """Keep an NVML worker running; without NVML, it says so once and this returns."""
    command = [sys.executable, "-m", "monitor.sources.nvml_worker", "--deadline", str(deadline)]
    command += ["--log-level", log_level, "--log-target", log_target]
    delay = RESTART_DELAYS[0]
    while True:
        watched: set[str] = set()
        started = trio.current_time()
        status = await run_worker(command, send, hub, watched)
        if status == EXIT_NO_NVML:
            return
        if trio.current_time() - started > RESTART_DELAYS[1]:
            delay = RESTART_DELAYS[0]  # it ran well for a while: this is a new failure
        reason = f"NVML worker crashed ({_death(status)}); restarting it"
        log.critical("%s in %g s", reason, delay)
        if watched:
            await send.send(tuple(NvmlUnreachable(a, reason) for a in sorted(watched)))
        await trio.sleep(delay)
        delay = min(delay * 2, RESTART_DELAYS[1])
