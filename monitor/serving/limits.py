"""How many connections each user may hold, and how long a connection may stay quiet."""

from __future__ import annotations

import attrs


class ConnectionCount:
    """Connections open now: per uid, and in the two pools the limits keep apart."""

    def __init__(self) -> None:
        self.per_uid: dict[int, int] = {}
        self.privileged = 0
        self.others = 0

    def add(self, uid: int, privileged: bool, change: int) -> None:
        count = self.per_uid.get(uid, 0) + change
        if count:
            self.per_uid[uid] = count
        else:
            del self.per_uid[uid]
        if privileged:
            self.privileged += change
        else:
            self.others += change


@attrs.frozen
class ConnectionLimits:
    """How many connections, and how idle, before a client is refused or closed.

    Root and the daemon's user have a pool of ``max_clients`` of their own, so no other user can
    keep them out; everyone else shares ``max_clients``, each uid at most ``per_uid`` of them."""

    max_clients: int = 1024
    per_uid: int = 64
    timeout: float = 60.0  # seconds to finish a line begun, or to send anything at all

    def refusal(self, count: ConnectionCount, uid: int, privileged: bool) -> str | None:
        """Why a new connection of ``uid`` is refused now, or None."""
        if privileged:
            if count.privileged >= self.max_clients:
                return f"Too many clients (limit {self.max_clients}); try again later."
            return None
        if count.per_uid.get(uid, 0) >= self.per_uid:
            return f"Too many connections from uid {uid} (limit {self.per_uid}); try again later."
        if count.others >= self.max_clients:
            return f"Too many clients (limit {self.max_clients}); try again later."
        return None


class LeaseRate:
    """Lease-changing requests each uid may make: ``burst`` at once, then ``rate`` a second.

    Every lease change is a record on disk and a line in the journal, and journald drops a
    service's entries beyond its own rate limit; a group member in a loop must not take root's
    grants or the health alerts with it. Root and the daemon's user are never asked here."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, when counted)

    def refusal(self, uid: int, now: float) -> str | None:
        """Take one request of ``uid``'s; why it is refused, if it is."""
        tokens, then = self._buckets.get(uid, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[uid] = (tokens, now)
            return (
                f"Too many reservation changes from uid {uid} (at most {self.rate:g} a second, "
                f"{self.burst} at once); slow down."
            )
        self._buckets[uid] = (tokens - 1, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._forget_full(now)
        return None

    def _forget_full(self, now: float) -> None:
        """Drop the uids whose bucket has filled up again: they are as good as new."""
        for uid, (tokens, then) in list(self._buckets.items()):
            if tokens + (now - then) * self.rate >= self.burst:
                del self._buckets[uid]


MAX_BUCKETS = 1024  # uids remembered before those at rest are forgotten
