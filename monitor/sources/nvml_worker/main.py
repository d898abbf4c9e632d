"""The worker process: start NVML, read the daemon's requests, write the events, shut NVML down.

It exits at the end of stdin (the daemon's cue), or with EXIT_NO_NVML after saying once that NVML
is not there (``pipe``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import AsyncIterator

import pynvml
import trio

from monitor.outputs import logs
from monitor.sources.nvml_worker.library import text
from monitor.sources.nvml_worker.pipe import (
    EXIT_NO_NVML,
    MigRescan,
    Output,
    SampleRequest,
    decode_request,
    encode_event,
)
from monitor.sources.nvml_worker.tasks import NvmlSource
from monitor.wire.framing import LineBuffer

log = logging.getLogger("monitor.sources.nvml_worker")  # one name for the whole worker


async def _targets(
    stdin: trio.abc.ReceiveStream, source: NvmlSource
) -> AsyncIterator[tuple[set[str], set[str]]]:
    """The GPUs to watch, from each ``watch`` line; a ``sample`` line starts a sample."""
    buffer = LineBuffer()
    while data := await stdin.receive_some(1 << 16):
        for line in buffer.feed(data):
            try:
                request = decode_request(line)
            except ValueError as exc:
                log.error("ignoring a line from the daemon: %s", exc)
                continue
            if isinstance(request, SampleRequest):
                assert source.nursery is not None  # the first watch line came before
                source.nursery.start_soon(source.sample, request.seq)
                continue
            if isinstance(request, MigRescan):
                source.rescan_mig()
                continue
            yield request.watch, request.reset


async def _write_events(events: trio.MemoryReceiveChannel[Output]) -> None:
    stdout = trio.lowlevel.FdStream(os.dup(1))
    async for event in events:
        await stdout.send_all(encode_event(event))


async def serve(deadline: float, health_interval: float = 0.0) -> int:
    """Watch the GPUs the daemon names until stdin ends; the exit status."""
    limiter = trio.CapacityLimiter(64)  # one call per GPU at most; never the loop's own threads
    try:
        await trio.to_thread.run_sync(pynvml.nvmlInit, limiter=limiter, abandon_on_cancel=True)
    except pynvml.NVMLError as exc:
        log.info(
            "NVML is not available (%s): NVIDIA GPUs are followed through udev alone, "
            "without XIDs or NVML's attributes",
            exc,
        )
        return EXIT_NO_NVML
    try:
        version = await trio.to_thread.run_sync(
            pynvml.nvmlSystemGetDriverVersion, limiter=limiter, abandon_on_cancel=True
        )
        log.info("NVML ready, driver %s", text(version))
        send, receive = trio.open_memory_channel[Output](64)
        source = NvmlSource(
            send, deadline=deadline, limiter=limiter, health_interval=health_interval
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_events, receive)
            await source.follow(_targets(trio.lowlevel.FdStream(os.dup(0)), source))
            nursery.cancel_scope.cancel()
        return 0
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(deadline):
            await trio.to_thread.run_sync(pynvml.nvmlShutdown, abandon_on_cancel=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="hotplug-monitor's NVML worker (run by serve)")
    parser.add_argument("--deadline", type=float, default=5.0)
    parser.add_argument("--health-interval", type=float, default=0.0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-target", default="auto")
    args = parser.parse_args()
    # The daemon stops us by closing stdin; a signal meant for the whole service (Ctrl-C, or
    # systemd's SIGTERM to the control group) must not look like a crash to it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(args.log_level, args.log_target)
    raise SystemExit(trio.run(serve, args.deadline, args.health_interval))
