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
