"""Ending the leases of Nomad tasks that ended: every ``reconcile_interval`` seconds, the local
agent's allocations for this node (``allocations``) become the daemon's ``reconcile`` of the
``nomad`` owner, keeping what Nomad reserved within the last two intervals (an allocation the
plugin just reserved for may not be listed yet).

Fail-safe: an agent that cannot be reached, answers an HTTP error, more than ``MAX_ANSWER``
bytes or anything not in the documented shape, or a node ID that does not match, ends no lease;
that is said once (a warning), and tried again with back-off until it works.

The agent is asked with the standard library's urllib (one short request per interval needs no
HTTP dependency), in a thread of its own that the plugin does not wait for at exit; without
proxies (the environment's would see the token) and without redirects (urllib would send the
token on to wherever they point). The ACL token is read from its file at each request, so that
it can be rotated, and is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from monitor.adapters.nomad import allocations
from monitor.adapters.nomad.config import PluginConfig
from monitor.wire import requests
from monitor.wire.asyncio_transport import AsyncioClient
from monitor.wire.backoff import Backoff
from monitor.wire.errors import DaemonUnavailable, RpcError

log = logging.getLogger("nomad-plugin")

OWNER = "nomad"
# An allocation carries its whole job: 1,000 allocations of a large job are some MiB. More than
# this is not an answer to use (nor to hold in memory).
MAX_ANSWER = 32 << 20
MAX_TOKEN_FILE = 4096
REQUEST_TIMEOUT_S = 10.0  # per request, for the whole answer
DAEMON_TIMEOUT_S = 10.0
MOST_BACKOFF_S = 600.0

T = TypeVar("T")


class AgentError(Exception):
    """The agent did not give a usable answer; the message says why (never the token)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx is then an HTTPError like any other


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_TOKEN_FILE + 1)
    except OSError as error:
        raise AgentError(f"cannot read the token file {path}: {error.strerror}") from None
    token = raw.decode("ascii", "replace").strip()
    if len(raw) > MAX_TOKEN_FILE or not token or not token.isprintable() or " " in token:
        raise AgentError(f"the token file {path} does not hold one ACL token")
    return token


def get_json(address: str, path: str, token: str | None) -> Any:
    """``GET address+path``'s JSON answer (blocking)."""
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["X-Nomad-Token"] = token
    request = urllib.request.Request(address + path, headers=headers)
    deadline = time.monotonic() + REQUEST_TIMEOUT_S  # urllib's timeout is per read
    chunks: list[bytes] = []
    size = 0
    try:
        with _OPENER.open(request, timeout=REQUEST_TIMEOUT_S) as response:
            while chunk := response.read1(1 << 16):
                size += len(chunk)
                chunks.append(chunk)
                if size > MAX_ANSWER:
                    raise AgentError(f"{path} answered more than {MAX_ANSWER >> 20} MiB")
                if time.monotonic() > deadline:
                    raise AgentError(f"{path} took more than {REQUEST_TIMEOUT_S:g} s to answer")
    except urllib.error.HTTPError as error:
        raise AgentError(f"{path} answered HTTP {error.code}") from None
    except (OSError, ValueError, http.client.HTTPException) as error:  # refused, reset, timed out
        raise AgentError(f"cannot reach the agent at {address}: {error}") from None
    body = b"".join(chunks)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:
        raise AgentError(f"{path} answered something other than JSON: {error}") from None


def in_use(address: str, token_file: Path | None) -> set[str]:
    """The device IDs this node's allocations may still use (blocking); AgentError else."""
    token = read_token(token_file)
    try:
        node = allocations.node_id(get_json(address, "/v1/agent/self", token))
        answer = get_json(address, f"/v1/node/{node}/allocations", token)
        return allocations.devices_in_use(answer, node)
    except allocations.NotNomadShape as error:
        raise AgentError(f"the agent's answer is not Nomad's: {error}") from None


def still_used(
    in_nomad: Iterable[str], reserved_at: dict[str, float], now: float, grace: float
) -> list[str]:
    """What Nomad uses: its answer, and whatever it reserved less than ``grace`` ago (entries
    older than that are dropped)."""
    for device_id, at in list(reserved_at.items()):
        if now - at >= grace:
            del reserved_at[device_id]
    return sorted(set(in_nomad) | set(reserved_at))


async def in_thread(work: Callable[[], T]) -> T:
    """``work()`` in a daemon thread: unlike asyncio's executor, a hung request does not hold
    up the plugin's exit (Nomad kills a plugin that takes 2 s to stop)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():
            outcome()

    def run() -> None:
        try:
            result = work()
        except BaseException as error:  # handed to the awaiting task as it is
            failed = error
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(settle, lambda: done.set_exception(failed))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: done.set_result(result))

    threading.Thread(target=run, name="nomad-agent", daemon=True).start()
    return await done


class Reconciler:
    """Started with the plugin's long-lived launch (its first Fingerprint); ``reserved`` is told
    of each device Nomad reserves."""

    def __init__(
        self,
        config: Callable[[], PluginConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._clock = clock
        self.reserved_at: dict[str, float] = {}
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def reserved(self, device_ids: Iterable[str]) -> None:
        now = self._clock()
        for device_id in device_ids:
            self.reserved_at[device_id] = now

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff: Backoff | None = None
        delay = self._config().reconcile_interval  # the first, like the others, an interval on
        while True:
            await asyncio.sleep(max(delay, 1.0))
            interval = self._config().reconcile_interval
            if interval <= 0:  # off; a later SetConfig may turn it on
                delay = 1.0
                continue
            if backoff is None or backoff.first != interval:
                backoff = Backoff(first=interval, most=max(interval, MOST_BACKOFF_S))
            worked = await self.reconcile_once()
            if worked is not None:
                backoff.reset()
            delay = interval if worked is not None else backoff.delay()

    async def reconcile_once(self) -> list[str] | None:
        """One reconcile: the devices whose leases ended, or None when it could not be done."""
        config = self._config()
        try:
            async with asyncio.timeout(2 * REQUEST_TIMEOUT_S + 1):
                used = await in_thread(
                    lambda: in_use(config.nomad_address, config.nomad_token_file)
                )
        except (AgentError, TimeoutError) as error:
            reason = str(error) or f"the agent at {config.nomad_address} did not answer in time"
            self._failed(f"{reason}; no lease is ended until it answers")
            return None
        keep = still_used(used, self.reserved_at, self._clock(), 2 * config.reconcile_interval)
        try:
            async with asyncio.timeout(DAEMON_TIMEOUT_S):
                async with AsyncioClient.open(config.socket) as client:
                    result = await client.ask(requests.reconcile(OWNER, keep))
        except (DaemonUnavailable, RpcError, TimeoutError) as error:
            self._failed(f"the daemon did not take the reconcile ({error})")
            return None
        if self._failing:
            log.info("reconciling Nomad's leases again")
            self._failing = False
        released = result.get("released") if isinstance(result, dict) else None
        ended = [r for r in released if isinstance(r, str)] if isinstance(released, list) else []
        if ended:
            log.info("leases of ended Nomad tasks released", extra={"devices": ended[:50]})
        return ended

    def _failed(self, reason: str) -> None:
        if not self._failing:
            self._failing = True
            log.warning("cannot reconcile Nomad's leases", extra={"reason": reason[:500]})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
