"""NVML source: runs the NVML worker processes and passes their events on.

NVML is a vendor library loaded into whatever process calls it, and a crash in it (a segfault, an
abort) would end that process. So the daemon never loads it: the worker
(``monitor.sources.nvml_worker``, spoken to as its ``pipe`` module says) does, in a child
process. This side tells each worker which GPUs to watch (the core's ``nvml_targets``: the NVIDIA
devices udev shows bound to the ``nvidia`` driver, and ``nvml_resets``: which of them a PCI
recovery reset), reads the events it writes, and if it dies, marks those GPUs "NVML worker
crashed" and starts it again. Which worker watches which GPU, and when a fresh one is started
because NVML's enumeration lacks a GPU, is ``monitor.sources.nvml_pool``'s. It also ends the wait
of a GPU that NVML has not named in time.

A GPU is read again when udev reports it added or rebound, and after the evidence of a reset
(a recovery that cleared its problems), never on a timer. Its statistics are read only when
``NvmlStats.sample`` asks (a ``stats`` subscriber): a ``{"sample": N}`` line to the worker,
answered by one line with every GPU that answered in time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from monitor.core.events import (
    Event,
    MigLayoutSeen,
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
from monitor.sources.mig_minors import MinorsReader, checked_layout
from monitor.sources.nvml_pool import Pool, Slot
from monitor.sources.nvml_worker.pipe import (
    EXIT_NO_NVML,
    SAMPLE_WINDOW,
    NotFound,
    OutputReader,
    StatsSample,
    encode_mig_rescan,
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
    """The NVIDIA GPUs' statistics, asked of every worker that runs now (each watches its own
    GPUs, ``monitor.sources.nvml_pool``)."""

    def __init__(self) -> None:
        self.pipes: set[WorkerPipe] = set()
        self._seq = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[Sample]]] = {}

    async def sample(self) -> Sample:
        """Each GPU that answered in time; nothing while no worker runs (or none answers)."""
        found: Sample = {}
        async with trio.open_nursery() as nursery:
            for pipe in list(self.pipes):
                nursery.start_soon(self._sample_one, pipe, found)
        return found

    async def _sample_one(self, pipe: WorkerPipe, into: Sample) -> None:
        seq = next(self._seq)
        answered, found = trio.Event(), list[Sample]()
        self._waiting[seq] = (answered, found)
        try:
            with trio.move_on_after(SAMPLE_ANSWER_SECONDS):
                await pipe.send_line(encode_sample_request(seq))
                await answered.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died or was ended; its GPUs are another worker's or none's
        finally:
            del self._waiting[seq]
        if found:
            into.update(found[0])

    async def rescan_mig(self) -> None:
        """Ask every worker to read its GPUs' MIG layouts again (SIGHUP)."""
        for pipe in list(self.pipes):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await pipe.send_line(encode_mig_rescan())

    def deliver(self, sample: StatsSample) -> None:
        waiting = self._waiting.get(sample.seq)
        if waiting is not None and not waiting[0].is_set():
            waiting[1].append(sample.devices)
            waiting[0].set()


async def _tell_targets(pipe: WorkerPipe, slot: Slot) -> None:
    """Write the GPUs this worker is to watch whenever they change, and those a PCI recovery
    reset; the first line after a (re)start names them all afresh."""
    told: dict[str, int] | None = None
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # it died
        while not slot.ended:
            slot.changed = trio.Event()
            targets = dict(slot.assigned)
            if targets != told or told is None:
                await pipe.send_line(encode_targets(targets, nvml_resets(told, targets)))
                told = targets
            await slot.changed.wait()
        await pipe.stdin.aclose()  # ended: the worker lets NVML go and exits


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


async def _pass_events(
    stdout: trio.abc.ReceiveStream,
    send: Send,
    stats: NvmlStats,
    pool: Pool,
    slot: Slot,
    minors: MinorsReader,
) -> None:
    """Send on each batch of events the worker writes, until its stdout ends; hand samples to
    whoever asked for them, and GPUs it does not find to the pool."""
    reader = OutputReader(MAX_WORKER_LINE)
    while data := await stdout.receive_some(1 << 16):
        outputs, errors = reader.feed(data)
        for error in errors:
            log.error("ignoring a line from the NVML worker: %s", error)
        events: list[Event] = []
        for output in outputs:
            if isinstance(output, StatsSample):
                stats.deliver(output)
            elif isinstance(output, NotFound):
                if events:
                    await send.send(tuple(events))
                    events = []
                await pool.not_found(slot, output, trio.current_time())
            elif isinstance(output, NvmlGpuSeen):
                pool.seen(output.gpu.address)
                events.append(NvmlGpuSeen(checked_gpu(output.gpu)))
            elif not (slot.ended or output.address in slot.assigned):
                pass  # a GPU this worker no longer watches; another reports it now
            elif isinstance(output, MigLayoutSeen):
                events.append(checked := checked_layout(output))
                # The driver's minors may be new with the instances; no instances, no need.
                read = await minors.read_if_changed() if checked.layout.instances else None
                if read is not None:
                    events.append(read)
            elif isinstance(output, XidReported):  # read now, by NVML: the core pairs it so
                events.append(
                    attrs.evolve(output, source="nvml", at=trio.current_time(), inferred=False)
                )
            else:
                events.append(output)
        if events:
            await send.send(tuple(events))


async def run_worker(
    command: list[str], send: Send, slot: Slot, pool: Pool, stats: NvmlStats, minors: MinorsReader
) -> int:
    """Run one NVML worker until it exits or its slot ends; its exit status (negative: killed
    by that signal), None if it was ended."""
    slot.started = trio.current_time()
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    pipe = WorkerPipe(process.stdin)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tell_targets, pipe, slot)
            stats.pipes.add(pipe)
            await _pass_events(process.stdout, send, stats, pool, slot, minors)  # ends with it
            nursery.cancel_scope.cancel()
        return await process.wait()
    finally:
        stats.pipes.discard(pipe)
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
    health_interval: float = 30.0,
    mig_minors: Path | None = None,
    log_level: str = "info",
    log_target: str = "auto",
    stats: NvmlStats | None = None,
    counts: SourceCounts | None = None,
) -> None:
    """Keep NVML workers running for the GPUs bound to ``nvidia``; without NVML, it says so
    once and this returns."""
    stats, counts = stats or NvmlStats(), counts or SourceCounts()
    command = [sys.executable, "-m", "monitor.sources.nvml_worker", "--deadline", str(deadline)]
    command += ["--health-interval", str(health_interval)]
    command += ["--log-level", log_level, "--log-target", log_target]
    absent = trio.Event()
    minors = MinorsReader(mig_minors)
    async with trio.open_nursery() as nursery:

        def start(slot: Slot) -> None:
            worker = partial(_keep_worker, command, send, slot, pool, stats, counts, absent, minors)
            nursery.start_soon(worker)

        pool = Pool(send.send, start)
        nursery.start_soon(end_name_waits, changes, send, deadline)
        nursery.start_soon(_follow_targets, changes, pool)
        await absent.wait()
        await send.send((NvmlAbsent(),))
        nursery.cancel_scope.cancel()


async def _follow_targets(changes: Changes, pool: Pool) -> None:
    """Hand the pool the GPUs to watch as they change, and retry those NVML did not find when
    their wait is over."""
    states = changes()
    latest: list[State] = []

    async def read() -> None:
        async for state in states:
            latest[:] = [state]
            pool.wake.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        told: dict[str, int] | None = None
        due = math.inf
        while True:
            with trio.move_on_at(due):
                await pool.wake.wait()
            pool.wake = trio.Event()
            if latest and (targets := nvml_targets(latest[0])) != told:
                pool.set_targets(targets, trio.current_time())
                told = targets
            due = pool.retry_due(trio.current_time())


async def _keep_worker(
    command: list[str],
    send: Send,
    slot: Slot,
    pool: Pool,
    stats: NvmlStats,
    counts: SourceCounts,
    absent: trio.Event,
    minors: MinorsReader,
) -> None:
    """Run a slot's worker until the slot ends, starting it again each time it dies."""
    delay = RESTART_DELAYS[0]
    while not slot.ended:
        started = trio.current_time()
        status = await run_worker(command, send, slot, pool, stats, minors)
        if slot.ended:
            return
        if status == EXIT_NO_NVML:
            absent.set()
            return
        if trio.current_time() - started > RESTART_DELAYS[1]:
            delay = RESTART_DELAYS[0]  # it ran well for a while: this is a new failure
        reason = f"NVML worker crashed ({_death(status)}); restarting it"
        log.critical("%s in %g s", reason, delay)
        if slot.assigned:
            await send.send(tuple(NvmlUnreachable(a, reason) for a in sorted(slot.assigned)))
        await trio.sleep(delay)
        delay = min(delay * 2, RESTART_DELAYS[1])
        counts.nvml_worker_restarts += 1
