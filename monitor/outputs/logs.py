"""Logging: native journald entries with structured fields, or plain stderr with ``<N>`` prefixes.

Health transitions are one entry each, with a stable MESSAGE_ID per kind (explained in
``systemd/hotplug-monitor.catalog``) and the device's fields, so operators can filter and alert
on them: ``journalctl MESSAGE_ID=... DEVICE_ID=0000:3b:00.0``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from monitor.core.leases import Lease, LeaseChange
from monitor.core.transitions import (
    DeviceMoved,
    Entry,
    HealthTransition,
    LeaseWarning,
    WorkFailed,
)

NOTICE = 25  # between INFO and WARNING, as syslog has it
logging.addLevelName(NOTICE, "NOTICE")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "hotplug-monitor"

# syslog priorities (sd-daemon(3)): what both targets use
PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    NOTICE: 5,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

# Stable per kind of event; each has an entry in systemd/hotplug-monitor.catalog.
MESSAGE_IDS = {
    "lost": "5a1d3c0e7b2f4e6a9c8d4b1f0e2a3c71",
    "unhealthy": "8e4b2a1c6d3f4b7e9a0c5d2e1f3b4a82",
    "recovered": "c3f1e2d4b5a64c7d8e9f0a1b2c3d4e93",
    "uevents_lost": "2b7e9c1d4f3a4e5b8c6d7e0f1a2b3ca4",
    "lease_revoked": "7d2c4e6f8a0b4c1d9e3f5a7b9c1d3e05",
    "xid": "4f8e2d6c1b3a4e9d8c7b6a5f4e3d2c16",
    "added": "735fb4ede41042a6a12bf19831911796",
    "removed": "48131dcd75304ea29f1e8d3023f02329",
    "granted": "1c70986168ae44408d8f6cc6f4224274",
    "released": "ad179e5adeb94dab9f6162cf0f47b41e",
    "ended": "0035218812e04a9ba83314206956a04e",
    "lease_summary": "b5e0f3a2c4d64e1f8a7b9c0d2e4f6a18",  # monitor.outputs.leaselog
    "work_failed": "e61b0c2a9f3d4d58a7c4b2e8f1d09a37",
}
LEVELS = {"lost": logging.CRITICAL, "unhealthy": logging.ERROR, "recovered": NOTICE}


def priority(levelno: int) -> int:
    return PRIORITIES.get(levelno, 7 if levelno < logging.INFO else 2)


class JournalHandler(logging.Handler):
    """Writes each record as a native journal entry; ``extra={"journal": {...}}`` adds fields."""

    def __init__(self) -> None:
        super().__init__()
        from cysystemd import journal

        self._send = journal.send

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = getattr(record, "journal", {})
        try:
            self._send(
                message=self.format(record),
                priority=priority(record.levelno),
                syslog_identifier=IDENTIFIER,
                logger=record.name,
                **{k.lower(): str(v) for k, v in fields.items()},
            )
        except Exception:
            self.handleError(record)


class PriorityFormatter(logging.Formatter):
    """``<3>message``: the prefix journald and syslog readers turn into a priority."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{super().format(record)}"


def journal_available() -> bool:
    return "JOURNAL_STREAM" in os.environ or os.path.exists(JOURNAL_SOCKET)


def setup(level: str, target: str = "auto") -> str:
    """Route the root logger to the journal or stderr; returns the target chosen.

    ``auto`` is stderr when it is a terminal (a person is watching), else the journal when it
    runs (under systemd, stderr is the journal's stream anyway). On stderr, lines carry ``<N>``
    priority prefixes for a journal or syslog reading the stream, but not on a terminal, where a
    person reads them."""
    watched = sys.stderr.isatty()
    if target == "auto":
        target = "journal" if not watched and journal_available() else "stderr"
    handler: logging.Handler
    if target == "journal":
        handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        text = "%(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(text) if watched else PriorityFormatter(text))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return target


def report(log: logging.Logger, entry: Entry) -> None:
    """One journal entry for what a fold did, with the fields operators filter on."""
    match entry:
        case HealthTransition():
            report_health(log, entry)
        case DeviceMoved():
            report_move(log, entry)
        case LeaseWarning():
            report_lease_warning(log, entry)
        case WorkFailed():
            report_work_failed(log, entry)
        case LeaseChange():
            report_lease_change(log, entry)


def _device_fields(device_id: str, vendor: str, name: str, uuid: str | None) -> dict[str, Any]:
    fields = {"DEVICE_ID": device_id, "PCI_BUS_ID": device_id, "VENDOR": vendor}
    fields["DEVICE_NAME"] = name
    if uuid:
        fields["GPU_UUID"] = uuid
    return fields


def _lease_fields(lease: Lease) -> dict[str, Any]:
    pid = lease.holder_pid if lease.holder_pid is not None else lease.pid
    return {"LEASE_ID": lease.id, "LEASE_UID": lease.uid, "LEASE_PID": pid}


def report_move(log: logging.Logger, move: DeviceMoved) -> None:
    """A device shown for the first time, or no longer."""
    fields = {"MESSAGE_ID": MESSAGE_IDS[move.kind]}
    fields |= _device_fields(move.device_id, move.vendor, move.device_name, move.uuid)
    what = "is here, healthy" if move.kind == "added" else "is gone"
    log.info(
        "%s (%s %s) %s",
        move.device_id,
        move.vendor,
        move.device_name,
        what,
        extra={"journal": fields},
    )


def report_lease_change(log: logging.Logger, change: LeaseChange) -> None:
    """A lease granted, released (some of its devices or all) or ended, and why."""
    fields = {"MESSAGE_ID": MESSAGE_IDS[change.kind], **_lease_fields(change.lease)}
    fields["DEVICE_ID"] = ",".join(change.devices)
    verb = "ends: " if change.kind == "ended" else ""
    devices = ", ".join(change.devices)
    log.info(
        "reservation %s %s%s: %s", change.lease.id, verb, change.reason, devices,
        extra={"journal": fields},
    )  # fmt: skip


def report_health(log: logging.Logger, transition: HealthTransition) -> None:
    """One entry per health transition, with the fields operators filter on."""
    fields = {
        "MESSAGE_ID": MESSAGE_IDS[transition.kind],
        **_device_fields(
            transition.device_id, transition.vendor, transition.device_name, transition.uuid
        ),
        "HEALTH": "healthy" if transition.kind == "recovered" else "unhealthy",
    }
    if transition.recovery_action:
        fields["RECOVERY_ACTION"] = transition.recovery_action
    if transition.xid is not None:
        fields["XID"] = str(transition.xid)
    if transition.xid_source is not None:
        fields["XID_SOURCE"] = transition.xid_source
    if transition.reason:
        fields["RECOVERY_REASON"] = transition.reason
    if transition.conditions:
        fields["HEALTH_CONDITIONS"] = ",".join(transition.conditions)
    if transition.holders:
        fields["LEASE_HOLDERS"] = "; ".join(transition.holders)
    what = {
        "lost": "is lost",
        "unhealthy": "is unhealthy",
        "recovered": "is healthy again; it was",
    }[transition.kind]
    because = f" (evidence: {transition.reason})" if transition.reason else ""
    if transition.holders:
        because += f"; held by {fields['LEASE_HOLDERS']}"
    log.log(
        LEVELS[transition.kind],
        "%s (%s %s) %s: %s%s",
        transition.device_id,
        transition.vendor,
        transition.device_name,
        what,
        transition.health_desc,
        because,
        extra={"journal": fields},
    )


def _holder(lease: Lease) -> str:
    holder = f"uid {lease.uid}, pid {lease.pid}"
    if lease.holder_pid is not None:
        holder += f", holder process {lease.holder_pid}"
    return holder


def report_work_failed(log: logging.Logger, failed: WorkFailed) -> None:
    """A leased GPU's application failed (RESTART_APP): one warning naming who held it."""
    lease = failed.lease
    fields = {
        "MESSAGE_ID": MESSAGE_IDS["work_failed"],
        "DEVICE_ID": failed.device_id,
        "PCI_BUS_ID": failed.device_id,
        "XID": failed.xid,
        **_lease_fields(lease),
    }
    log.warning(
        "%s, reserved by %s (%s): %s; the application failed, the GPU stays schedulable",
        failed.device_id,
        lease.id,
        _holder(lease),
        failed.desc,
        extra={"journal": fields},
    )


def report_lease_warning(log: logging.Logger, warning: LeaseWarning) -> None:
    """A reserved device left or broke: one warning naming the lease and who holds it."""
    lease = warning.lease
    holder = _holder(lease)
    fields = {
        "MESSAGE_ID": MESSAGE_IDS["lease_revoked"],
        "DEVICE_ID": warning.device_id,
        "PCI_BUS_ID": warning.device_id,
        **_lease_fields(lease),
        "HEALTH": "unhealthy",
    }
    log.warning(
        "%s, reserved by %s (%s), is no longer usable: %s",
        warning.device_id,
        lease.id,
        holder,
        warning.health_desc,
        extra={"journal": fields},
    )
