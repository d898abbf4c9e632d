"""The driver's mig-minors file, read in the daemon, and MIG layouts checked as they come.

The file (``--mig-minors``, ``/proc/driver/nvidia-caps/mig-minors``) names the minor of each
``/dev/nvidia-caps/nvidia-capN`` a MIG instance's container needs. It is input like any other:
read up to ``MIG_MINORS_LIMIT`` bytes, from a regular file only, malformed lines skipped
(``monitor.core.mig.parse_mig_minors``). It is read again whenever a GPU's MIG layout with
instances arrives (a repartition, a sweep, SIGHUP), off the event loop; what changed goes to the
core. A host with no MIG instances never reads it, so never warns that it is missing. A file that
cannot be read leaves MIG devices without capability nodes, and the core refuses to lease them
with the reason (``monitor.core.rules.mig_reserve``); the reason is logged once per change.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import attrs
import trio

from monitor.core.events import MigLayoutSeen, MigMinorsRead
from monitor.core.mig import MIG_MINORS_LIMIT, MigLayout, MigMinors, is_mig_uuid, parse_mig_minors
from monitor.core.text import shown

log = logging.getLogger(__name__)


def read_mig_minors(path: Path) -> MigMinors:
    """The file's access entries, or none and why. Blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        return MigMinors(problem=f"cannot read {path}: {exc.strerror or exc}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return MigMinors(problem=f"{path} is not a regular file")
        data = b""
        while len(data) <= MIG_MINORS_LIMIT:
            chunk = os.read(fd, MIG_MINORS_LIMIT + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        return MigMinors(problem=f"cannot read {path}: {exc.strerror or exc}")
    finally:
        os.close(fd)
    if len(data) > MIG_MINORS_LIMIT:
        return MigMinors(problem=f"{path} is larger than {MIG_MINORS_LIMIT} bytes")
    return parse_mig_minors(data.decode("utf-8", "replace"))


class MinorsReader:
    """Reads the file when asked; says what changed since the last read."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.last: MigMinors | None = None

    async def read_if_changed(self) -> MigMinorsRead | None:
        if self.path is None:
            return None
        found = await trio.to_thread.run_sync(read_mig_minors, self.path)
        if found == self.last:
            return None
        if found.problem and (self.last is None or self.last.problem != found.problem):
            log.warning("MIG instances get no capability nodes: %s", found.problem)
        self.last = found
        return MigMinorsRead(found)


def checked_layout(event: MigLayoutSeen) -> MigLayoutSeen:
    """A layout without the MIG devices whose UUID is not in NVIDIA's present form (they can
    name no device), saying so once per layout."""
    layout = event.layout
    bad = [i.uuid for i in layout.instances if not is_mig_uuid(i.uuid)]
    if not bad:
        return event
    log.warning(
        "NVML gave the GPU at %s MIG devices with UUIDs not in the MIG-<uuid> form (%s): "
        "they are left out",
        event.address,
        ", ".join(shown(u, 80) for u in bad),
    )
    kept = tuple(i for i in layout.instances if is_mig_uuid(i.uuid))
    return attrs.evolve(event, layout=MigLayout(layout.enabled, kept))
