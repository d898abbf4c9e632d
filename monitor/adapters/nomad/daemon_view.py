"""The daemon's devices as the plugin offers them to Nomad, kept current by following the daemon
(``monitor.wire.asyncio_transport.follow``: a subscription, patches, reconnection with backoff).

Nothing is asked of the daemon until a Fingerprint, Reserve or Stats call needs it: Nomad's
short-lived launches (fingerprinting the plugin, validating its config) never connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from monitor.adapters import grpc_edge
from monitor.adapters.nomad import translate
from monitor.adapters.nomad.config import PluginConfig
from monitor.wire.mirror import Mirror

log = logging.getLogger("nomad-plugin")


def throttle_delay(now: float, last_sent: float, window: float) -> float:
    """How long to wait before sending a change, so that a burst of changes within ``window``
    seconds of the last message is one message; a lone change goes at once."""
    return max(0.0, last_sent + window - now)


class DaemonView:
    """The latest ``Offered`` (and a version that grows with each change Nomad would see)."""

    def __init__(self, config: PluginConfig) -> None:
        self.config = config
        self.offer = translate.Offered()
        self.version = 0
        self.link = grpc_edge.Reachability(
            lost=lambda: log.warning(
                f"{translate.UNREACHABLE} on {self.config.socket}: its devices are marked "
                "unhealthy until it answers again"
            ),
            back=lambda: log.info(
                "hotplug-monitor daemon reachable again",
                extra={"socket": str(self.config.socket)},
            ),
            left_out=lambda reason: log.warning(
                "left out of the fingerprint", extra={"reason": reason}
            ),
        )
        self._mirror: Mirror | None = None
        self._changed = asyncio.Condition()
        self._answered = asyncio.Event()  # the daemon answered once, or could not be reached
        self._task: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool | None:
        """Whether the daemon answered last (None: not asked yet)."""
        return self.link.reachable

    def start(self) -> None:
        """Follow the daemon from now on (once; later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def configure(self, config: PluginConfig) -> None:
        """New settings: the offer is made again from the last snapshot, and a new socket is
        followed from scratch."""
        moved = config.socket != self.config.socket
        self.config = config
        if moved and self._task is not None:
            await self.stop()
            self._mirror = None
            self.link.forget()
            self._answered.clear()
            await self._publish(translate.Offered())
            self.start()
        elif self._mirror is not None:
            await self._emit(self._mirror if self.reachable else None)

    async def _follow(self) -> None:
        await grpc_edge.follow(
            self.config.socket,
            self._emit,
            unreadable=lambda error: log.error(
                "the daemon's answer could not be read; trying again",
                extra={"error": f"{type(error).__name__}: {error}"[:500]},
            ),
        )

    async def _emit(self, mirror: Mirror | None) -> None:
        if mirror is None:
            self.link.unreachable()
            offer = translate.unreachable(
                translate.offered(self._mirror.snapshot, self.config)
                if self._mirror is not None
                else self.offer
            )
        else:
            self._mirror = mirror
            offer = translate.offered(mirror.snapshot, self.config)
            self.link.answered(offer.skipped)
        self._answered.set()
        await self._publish(offer)

    async def _publish(self, offer: translate.Offered) -> None:
        same = translate.same(offer.groups, self.offer.groups)
        self.offer = offer
        if same:
            return
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def first_answer(self, timeout: float) -> None:
        """Wait until the daemon answered once (or could not be reached), at most ``timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._answered.wait()

    async def newer_than(self, seen: int) -> int:
        """Wait for a version other than ``seen``; return it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen)
            return self.version

    def snapshot(self) -> object:
        """The daemon's snapshot as last received (None before the first)."""
        return None if self._mirror is None else self._mirror.snapshot


async def fingerprints(
    view: DaemonView,
    window: float,
    first_wait: float,
    *,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> AsyncGenerator[translate.Offered, None]:
    """What one Fingerprint stream sends: the offer at once (once the daemon answered, or
    ``first_wait`` passed), then the offer after each change Nomad would see, a burst within
    ``window`` seconds of the last message sent as one. Never periodic, and never ends by
    itself. ``clock`` and ``sleep`` are the event loop's unless a test gives its own."""
    now = clock or asyncio.get_running_loop().time
    await view.first_answer(first_wait)
    seen = view.version
    sent = view.offer
    last_sent = now()
    yield sent
    while True:
        seen = await view.newer_than(seen)
        delay = throttle_delay(now(), last_sent, window)
        if delay > 0:
            await sleep(delay)
            seen = view.version
        if translate.same(view.offer.groups, sent.groups):
            continue  # changed and changed back within the window
        sent = view.offer
        last_sent = now()
        yield sent
