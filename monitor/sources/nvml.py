"""NVML source: runs the NVML worker process and passes its events on.

NVML is a vendor library loaded into whatever process calls it, and a crash in it (a segfault, an
abort) would end that process. So the daemon never loads it: the worker
(``monitor.sources.nvml_worker``, spoken to as its ``pipe`` module says) does, in a child
process. This side tells the worker which GPUs to watch (the core's ``nvml_targets``: the NVIDIA
devices udev shows bound to the ``nvidia`` driver, and ``nvml_resets``: which of them a PCI
recovery reset), reads the events it writes, and if it dies, marks those GPUs "NVML worker
crashed" and starts a new one. It also ends the wait of a GPU that NVML has not named in time.

A GPU is read again when udev reports it added or rebound, and after the evidence of a reset
(a recovery that cleared its problems), never on a timer. Its statistics are read only when
``NvmlStats.sample`` asks (a ``stats`` subscriber): a ``{"sample": N}`` line to the worker,
answered by one line with every GPU that answered in time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio

from monitor.core.events import (
    Event,
    NvmlAbsent,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlNameWaitOver,
    NvmlUnreachable,
    XidReported,
)
from monitor.core.rules.nvidia import nvml_resets, nvml_targets
from monitor.core.state import State
from monitor.core.text import printable, shown
from monitor.sources.counts import SourceCounts
from monitor.sources.nvml_worker.pipe import (
    EXIT_NO_NVML,
    SAMPLE_WINDOW,
    OutputReader,
    StatsSample,
    encode_sample_request,
    encode_targets,
)

log = logging.getLogger(__name__)

Send = trio.MemorySendChannel[tuple[Event, ...]]
Changes = Callable[[], AsyncIterator[State]]  # the state now and after each change of it
# After the worker died: at once the first time, then less and less often while it keeps dying.
RESTART_DELAYS = (1.0, 60.0)  # the first, and the most
STOP_SECONDS = 1.0  # for the worker to shut NVML down once its stdin ends
MAX_WORKER_LINE = 16 << 20  # a sample of many GPUs is one line
SAMPLE_ANSWER_SECONDS = SAMPLE_WINDOW + 1.0  # a worker slower than this to answer: no sample

Sample = dict[str, dict[str, dict[str, Any]]]  # PCI address -> stat name -> {"value", "unit"}


class WorkerPipe:
    """The worker's stdin, written a whole line at a time by whoever needs to."""

    def __init__(self, stdin: trio.abc.SendStream) -> None:
        self.stdin = stdin
        self._lock = trio.Lock()

    async def send_line(self, line: bytes) -> None:
        async with self._lock:
            await self.stdin.send_all(line)


class NvmlStats:
    """The NVIDIA GPUs' statistics, asked of whichever worker runs now."""

    def __init__(self) -> None:
        self.pipe: WorkerPipe | None = None
        self._seq = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[Sample]]] = {}

    async def sample(self) -> Sample:
        """Each GPU that answered in time; nothing while no worker runs (or it does not answer)."""
        pipe = self.pipe
        if pipe is None:
            return {}
        seq = next(self._seq)
        answered, found = trio.Event(), list[Sample]()
        self._waiting[seq] = (answered, found)
        try:
            with trio.move_on_after(SAMPLE_ANSWER_SECONDS):
                await pipe.send_line(encode_sample_request(seq))
                await answered.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died; the source starts another
        finally:
            del self._waiting[seq]
        return found[0] if found else {}

    def deliver(self, sample: StatsSample) -> None:
        waiting = self._waiting.get(sample.seq)
        if waiting is not None and not waiting[0].is_set():
            waiting[1].append(sample.devices)
            waiting[0].set()


async def _tell_targets(pipe: WorkerPipe, states: AsyncIterator[State], watched: set[str]) -> None:
    """Write the GPUs to watch whenever they change, and those a PCI recovery reset."""
    told: dict[str, int] | None = None
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # it died
        async for state in states:
            targets = nvml_targets(state)
            if targets == told:
                continue
            await pipe.send_line(encode_targets(targets, nvml_resets(told, targets)))
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


def checked_gpu(gpu: NvmlGpu) -> NvmlGpu:
    """What NVML said of a GPU, its text made safe as udev's is: printable and bounded. A name
    with nothing left is empty (the core gives the GPU the hardware database's name). The UUID
    is an identity, never cleaned into one: the core judges its form as it came
    (``monitor.core.rules.nvidia``)."""
    name = printable(gpu.name) or ""
    if name != gpu.name:
        log.warning(
            "NVML reported the name %s for the GPU at %s; %s",
            shown(gpu.name),
            gpu.address,
            f"using {name!r}" if name else "using the hardware database's name",
        )
    attributes = {
        key: attrs.evolve(a, value=printable(a.value) or "") if isinstance(a.value, str) else a
        for key, a in gpu.attributes.items()
    }
    return attrs.evolve(gpu, name=name, attributes=attributes)


async def _pass_events(stdout: trio.abc.ReceiveStream, send: Send, stats: NvmlStats) -> None:
    """Send on each batch of events the worker writes, until its stdout ends; hand samples to
    whoever asked for them."""
    reader = OutputReader(MAX_WORKER_LINE)
    while data := await stdout.receive_some(1 << 16):
        outputs, errors = reader.feed(data)
        for error in errors:
            log.error("ignoring a line from the NVML worker: %s", error)
        events: list[Event] = []
        for output in outputs:
            if isinstance(output, StatsSample):
                stats.deliver(output)
            elif isinstance(output, NvmlGpuSeen):
                events.append(NvmlGpuSeen(checked_gpu(output.gpu)))
            elif isinstance(output, XidReported):  # read now, by NVML: the core pairs it so
                events.append(XidReported(output.address, output.xid, "nvml", trio.current_time()))
            else:
                events.append(output)
        if events:
            await send.send(tuple(events))


async def run_worker(
    command: list[str],
    send: Send,
    changes: Changes,
    watched: set[str],
    stats: NvmlStats | None = None,
) -> int:
    """Run one NVML worker until it exits; its exit status (negative: killed by that signal)."""
    stats = stats or NvmlStats()
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    pipe = WorkerPipe(process.stdin)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tell_targets, pipe, changes(), watched)
            stats.pipe = pipe
            await _pass_events(process.stdout, send, stats)  # its stdout ends when it does
            nursery.cancel_scope.cancel()
        return await process.wait()
    finally:
        if stats.pipe is pipe:
            stats.pipe = None
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
    stats: NvmlStats | None = None,
    counts: SourceCounts | None = None,
) -> None:
    """Keep an NVML worker running; without NVML, it says so once and this returns."""
    stats, counts = stats or NvmlStats(), counts or SourceCounts()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(end_name_waits, changes, send, deadline)
        await _keep_worker(send, changes, deadline, log_level, log_target, stats, counts)
        nursery.cancel_scope.cancel()


async def _keep_worker(
    send: Send,
    changes: Changes,
    deadline: float,
    log_level: str,
    log_target: str,
    stats: NvmlStats,
    counts: SourceCounts,
) -> None:
    command = [sys.executable, "-m", "monitor.sources.nvml_worker", "--deadline", str(deadline)]
    command += ["--log-level", log_level, "--log-target", log_target]
    delay = RESTART_DELAYS[0]
    while True:
        watched: set[str] = set()
        started = trio.current_time()
        status = await run_worker(command, send, changes, watched, stats)
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
        counts.nvml_worker_restarts += 1
