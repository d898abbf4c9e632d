"""The request table: each method's params, what it asks of the core, and its answer's JSON.

Plain calls, without trio or I/O, so that every parameter error is a plain call to test.
``parse`` turns a method and its params into a ``Call`` or a refusal, the core's own value; the
server supplies what only the edge knows (who asks, the holder process, which device nodes
exist) and does the waiting. ``rpc_error`` is the one place where a refusal's reason becomes a
JSON-RPC error code.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs

from monitor.core.access import Peer
from monitor.core.answers import Grant, Reason, Refusal, Released
from monitor.core.events import ReconcileRequested, ReleaseRequested, Request, ReserveRequested
from monitor.core.leases import MAX_DEVICES, OWNER, Holder
from monitor.core.plan import Exists, plan, with_edits
from monitor.core.rules.leasing import orphaned
from monitor.core.state import State
from monitor.wire.errors import (
    DEVICE_RESERVED,
    DEVICE_UNHEALTHY,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    PERMISSION_DENIED,
    UNKNOWN_DEVICE,
    RpcError,
)
from monitor.wire.reservations import cdi_name
from monitor.wire.stats import MAX_INTERVAL, MIN_INTERVAL

T = TypeVar("T")

ERROR_CODES = {
    Reason.UNKNOWN_METHOD: METHOD_NOT_FOUND,
    Reason.UNKNOWN_DEVICE: UNKNOWN_DEVICE,
    Reason.UNHEALTHY: DEVICE_UNHEALTHY,
    Reason.RESERVED: DEVICE_RESERVED,
    Reason.FORBIDDEN: PERMISSION_DENIED,
    Reason.INVALID: INVALID_PARAMS,
    Reason.NOT_RECORDED: INTERNAL_ERROR,
}


def rpc_error(refusal: Refusal) -> RpcError:
    data = dict(refusal.data) if refusal.data is not None else None
    return RpcError(ERROR_CODES[refusal.reason], refusal.message, data)


# --- params: each one's check, written once ----------------------------------------------------


class Invalid(Exception):
    """A param's value is refused; the message says what it must be."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@attrs.frozen
class Param(Generic[T]):
    """A param a method takes, and its check: the value to use, or ``Invalid``. An absent or
    null param reaches its check as None, which refuses it unless the param is ``optional``."""

    name: str
    check: Callable[[Any], T]

    def optional(self) -> Param[T | None]:
        """The same param, absent or null meaning "not given"."""
        return Param(self.name, functools.partial(_unless_none, self.check))


def _unless_none(check: Callable[[Any], T], value: Any) -> T | None:
    return None if value is None else check(value)


def _device_ids(value: Any, *, in_use: bool) -> tuple[str, ...]:
    """The one device_ids rule: a list of at most MAX_DEVICES strings. Devices asked for are at
    least one, each named; the devices still in use (``reconcile``) may be none, and an ID that
    names no device is just not in use."""
    if (
        isinstance(value, list)
        and (in_use or value)
        and len(value) <= MAX_DEVICES
        and all(isinstance(i, str) and (in_use or i) for i in value)
    ):
        return tuple(value)
    if in_use:
        raise Invalid(
            f"device_ids must be a list of the device IDs in use (at most {MAX_DEVICES})."
        )
    raise Invalid(
        f"device_ids must be a non-empty list of device ID strings (at most {MAX_DEVICES})."
    )


def _owner(value: Any) -> str:
    if isinstance(value, str) and OWNER.fullmatch(value):
        return value
    raise Invalid("owner must be a scheduler's name: 1 to 64 of a-z, 0-9, '.', '_' and '-'.")


def _interval(value: Any) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and MIN_INTERVAL <= value <= MAX_INTERVAL:
        return float(value)
    raise Invalid(f"interval must be a number of seconds from {MIN_INTERVAL} to {MAX_INTERVAL}.")


def _holder_pid(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise Invalid("holder_pid must be a positive process ID.")


def _cdi(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid("cdi must be true or false when given.")


def _bind(value: Any) -> bool:
    if value == "connection" and isinstance(value, str):
        return True
    raise Invalid('bind must be "connection" when given.')


RELEASE_FORMS = (
    'release takes "device_ids" (a list) or "reservation_id", optionally with "owner"; '
    'or "owner" alone, for all its leases.'
)


def _reservation_id(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise Invalid(RELEASE_FORMS)


DEVICE_IDS = Param("device_ids", functools.partial(_device_ids, in_use=False))
DEVICES_IN_USE = Param("device_ids", functools.partial(_device_ids, in_use=True))
OWNER_NAME = Param("owner", _owner)
MAYBE_OWNER = OWNER_NAME.optional()
INTERVAL = Param("interval", _interval)
HOLDER_PID = Param("holder_pid", _holder_pid).optional()
BIND = Param("bind", _bind).optional()
CDI = Param("cdi", _cdi).optional()
RESERVATION_ID = Param("reservation_id", _reservation_id)


class Given:
    """A request's params, each checked as the method reads it, in the order it reads them."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.names = frozenset(params)
        self._params = params

    def __getitem__(self, param: Param[T]) -> T:
        return param.check(self._params.get(param.name))


# --- what a method does ------------------------------------------------------------------------


class Read(enum.Enum):
    """What a method that changes nothing answers from."""

    SNAPSHOT = "fingerprint"
    SUBSCRIBE = "subscribe"  # the snapshot, then its changes on the same connection
    LEASES = "leases"
    STATUS = "status"


@attrs.frozen
class StreamStats:
    interval: float  # seconds


@attrs.frozen
class Asked:
    """What only the edge knows of a request for the reducer: who asks, on which connection,
    the token and lease ID it draws, the time, and the holder process it identified."""

    peer: Peer
    connection: int
    token: int
    lease_id: str
    created: float  # seconds since the epoch
    holder: Holder | None = None
    cdi_nodes: frozenset[str] | None = None  # asked for CDI: the vendor device nodes on disk


@attrs.frozen
class Ask:
    """A request for the reducer, made once the edge says what it knows (``Asked``).
    ``holder_pid``: the process the edge identifies first, as the lease's holder; ``cdi``: a
    reserve for CDI, for which the edge checks the vendor device nodes on disk."""

    request: Callable[[Asked], Request]
    holder_pid: int | None = None
    cdi: bool = False


Call = Read | StreamStats | Ask


def _reserve(given: Given) -> Ask:
    ids, bind = given[DEVICE_IDS], given[BIND]
    owner, holder_pid, cdi = given[MAYBE_OWNER], given[HOLDER_PID], given[CDI]

    def request(asked: Asked) -> Request:
        return ReserveRequested(
            token=asked.token,
            peer=asked.peer,
            device_ids=ids,
            lease_id=asked.lease_id,
            created=asked.created,
            holder=asked.holder,
            connection=asked.connection if bind else None,
            owner=owner,
            cdi_nodes=asked.cdi_nodes,
        )

    return Ask(request, holder_pid, cdi=bool(cdi))


def _release(given: Given) -> Ask:
    """By reservation, by devices, or (an owner alone) every lease of that owner."""
    owner = given[MAYBE_OWNER]
    which = given.names - {"owner"}
    if which == {"reservation_id"}:
        lease_id = given[RESERVATION_ID]
        return Ask(lambda a: ReleaseRequested(a.token, a.peer, lease_id=lease_id, owner=owner))
    if which == {"device_ids"}:
        ids = given[DEVICE_IDS]
        return Ask(lambda a: ReleaseRequested(a.token, a.peer, device_ids=ids, owner=owner))
    if not which and owner is not None:
        return Ask(lambda a: ReleaseRequested(a.token, a.peer, owner=owner))
    raise Invalid(RELEASE_FORMS)


def _reconcile(given: Given) -> Ask:
    ids, owner = given[DEVICES_IN_USE], given[OWNER_NAME]
    return Ask(lambda a: ReconcileRequested(a.token, a.peer, owner, ids))


@attrs.frozen
class Method:
    """A method's row of the table: the params it takes, and what it makes of them."""

    params: tuple[Param[Any], ...]  # what it takes; any other param is refused
    call: Callable[[Given], Call]  # reads each param through its ``Param``, checking it
    names: frozenset[str] = attrs.field(init=False)

    @names.default
    def _names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params)


METHODS: Mapping[str, Method] = {
    "fingerprint": Method((), lambda _: Read.SNAPSHOT),
    "subscribe": Method((), lambda _: Read.SUBSCRIBE),
    "leases": Method((), lambda _: Read.LEASES),
    "reserve": Method((DEVICE_IDS, HOLDER_PID, BIND, MAYBE_OWNER, CDI), _reserve),
    "release": Method((DEVICE_IDS, RESERVATION_ID, MAYBE_OWNER), _release),
    "stats": Method((INTERVAL,), lambda given: StreamStats(given[INTERVAL])),
    "status": Method((), lambda _: Read.STATUS),
    "reconcile": Method((OWNER_NAME, DEVICES_IN_USE), _reconcile),
}


def parse(method: str, params: Mapping[str, Any]) -> Call | Refusal:
    """What ``method`` with these params asks for, or why it is refused."""
    known = METHODS.get(method)
    if known is None:
        return Refusal(Reason.UNKNOWN_METHOD, f"Unknown method {method!r}.")
    unknown = sorted(set(params) - known.names)
    if unknown:
        return Refusal(Reason.INVALID, f"Unknown params: {', '.join(unknown)}.")
    try:
        return known.call(Given(params))
    except Invalid as invalid:
        return Refusal(Reason.INVALID, invalid.message)


NO_CDI_SPEC = Refusal(
    Reason.INVALID,
    "This daemon keeps no CDI spec (it runs with --no-cdi or without root): reserve without "
    '"cdi" and give the container the devices another way.',
)


def holder_refused(holder_pid: int, why: str) -> Refusal:
    """A holder_pid that names no process a lease can follow (``monitor.sources.holders``)."""
    return Refusal(Reason.INVALID, why, {"holder_pid": holder_pid})


# --- answers -----------------------------------------------------------------------------------


def released(answer: Released) -> dict[str, Any]:
    return {"released": list(answer.released), "not_reserved": list(answer.not_reserved)}


def reserved(grant: Grant, exists: Exists) -> dict[str, Any]:
    """The lease and the container edits for its devices; ``exists`` says which device nodes
    that drivers make outside udev's view are there."""
    edits = plan(grant.devices, minor_of=grant.nvidia_minors.get, exists=exists)
    lease = grant.lease
    return {"reservation_id": lease.id, "device_ids": list(lease.devices), **edits.to_json()}


def cdi_devices(grant: Grant, exists: Exists) -> list[str]:
    """The CDI names of the granted devices the CDI spec has entries for."""
    ids = with_edits(grant.devices, minor_of=grant.nvidia_minors.get, exists=exists)
    return [cdi_name(i) for i in ids]


def leases(state: State) -> dict[str, Any]:
    """Every lease, with the devices of it that are no longer on the host."""
    return {
        "leases": [
            {
                **lease.to_json(),
                "bind": "connection" if lease.connection is not None else None,
                "orphaned": list(orphaned(state, lease)),
            }
            for lease in state.leases.values()
        ]
    }
