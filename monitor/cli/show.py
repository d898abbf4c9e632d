"""What the commands print, from what the daemon answered: plain functions of JSON, no I/O."""

from __future__ import annotations

import shlex
import time
from typing import Any

from monitor.core.pci import class_name
from monitor.wire.mirror import Mirror


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def value(device: dict[str, Any], name: str) -> str:
    attribute = device["attributes"].get(name)
    return "-" if attribute is None else str(attribute["value"])


def health(device: dict[str, Any]) -> str:
    return "healthy" if device["healthy"] else f"UNHEALTHY: {device['health_desc']}"


def ends_with(lease: dict[str, Any]) -> str:
    """What ends a lease, in a few words."""
    if lease.get("owner"):
        return f"{lease['owner']}'s release"
    if lease["holder_pid"] is not None:
        return f"process {lease['holder_pid']}"
    if lease["bind"] == "connection":
        return "connection"
    return "release"


def holder(lease: dict[str, Any]) -> str:
    """Who holds a device: ``R (uid 1000, until process 123)``."""
    return f"{lease['reservation_id']} (uid {lease['uid']}, until {ends_with(lease)})"


def devices_table(fingerprint: dict[str, Any], leases: list[dict[str, Any]]) -> str:
    devices = Mirror(fingerprint).devices()
    if not devices:
        return "no matching devices"
    by_id = {lease["reservation_id"]: lease for lease in leases}
    rows = [["ID", "GROUP", "DRIVER", "NUMA", "HEALTH", "HELD BY"]]
    for device_id, (key, device) in sorted(devices.items()):
        lease = by_id.get(device.get("reserved_by", ""))
        held = holder(lease) if lease else device.get("reserved_by", "-")
        numa, driver = value(device, "numa_node"), value(device, "driver")
        rows.append([device_id, key, driver, numa, health(device), held])
    return table(rows)


def no_devices(default_classes: tuple[str, ...]) -> str:
    """What to say when nothing matches: which classes a daemon follows unless told otherwise,
    and how to tell it (the daemon's answers do not say which classes it was given)."""
    classes = ", ".join(
        f"0x{prefix} ({class_name(int(prefix[:2], 16) << 16)})" for prefix in default_classes
    )
    return (
        f"no matching devices: by default the daemon follows the PCI classes {classes}; "
        "to follow others, run it with serve --match-class HEX (repeatable; match_class in "
        "its config file)"
    )


def leases_table(leases: list[dict[str, Any]]) -> str:
    if not leases:
        return "no reservations"
    rows = [["RESERVATION", "DEVICES", "OWNER", "UID", "PID", "ENDS WITH", "SINCE", "STATE"]]
    for lease in leases:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease["created"]))
        orphaned = lease["orphaned"]
        state = f"orphaned: {', '.join(orphaned)} gone" if orphaned else "held"
        rows.append(
            [
                lease["reservation_id"],
                ",".join(lease["devices"]),
                lease.get("owner") or "-",
                str(lease["uid"]),
                str(lease["pid"]),
                ends_with(lease),
                since,
                state,
            ]
        )
    return table(rows)


def describe_changes(before: Mirror | None, after: Mirror) -> list[str]:
    """One line per device that appeared, vanished, changed health, attributes or holder."""
    old = before.devices() if before else {}
    new = after.devices()
    lines = []
    for device_id in sorted(old.keys() | new.keys()):
        if device_id not in new:
            lines.append(f"- {device_id} {old[device_id][0]} removed")
            continue
        key, device = new[device_id]
        if device_id not in old:
            lines.append(f"+ {device_id} {key} {health(device)}")
            lines += _held(device_id, key, {}, device)
            continue
        previous = old[device_id][1]
        if (previous["healthy"], previous["health_desc"]) != (
            device["healthy"],
            device["health_desc"],
        ):
            mark = "*" if device["healthy"] else "!"
            lines.append(f"{mark} {device_id} {key} {health(device)}")
        changed = sorted(
            name
            for name in previous["attributes"].keys() | device["attributes"].keys()
            if previous["attributes"].get(name) != device["attributes"].get(name)
        )
        if changed:
            values = ", ".join(f"{name}={value(device, name)}" for name in changed)
            lines.append(f"~ {device_id} {key} {values}")
        lines += _held(device_id, key, previous, device)
    return [f"[{after.generation}] {line}" for line in lines]


def _held(device_id: str, key: str, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``>`` reserved by a lease, ``<`` released, as ``watch`` shows it."""
    was, now = before.get("reserved_by"), after.get("reserved_by")
    if was == now:
        return []
    lines = [f"< {device_id} {key} released by {was}"] if was else []
    if now:
        owner = after.get("reserved_owner")
        lines.append(f"> {device_id} {key} reserved by {now}" + (f" for {owner}" if owner else ""))
    return lines


def reservation_lines(result: dict[str, Any]) -> list[str]:
    """A reservation as a person reads it."""
    lines = [f"reservation {result['reservation_id']}: {', '.join(result['device_ids'])}"]
    lines += [f"  env    {name}={v}" for name, v in result["envs"].items()]
    for mount in result["mounts"]:
        mode = "ro" if mount["read_only"] else "rw"
        lines.append(f"  mount  {mount['host_path']} -> {mount['task_path']} ({mode})")
    lines += [f"  device {d['host_path']} ({d['cgroup_perms']})" for d in result["devices"]]
    return lines


def env_lines(result: dict[str, Any]) -> list[str]:
    """``export NAME='value'`` lines, for ``eval`` in a shell (names checked, values quoted)."""
    return [f"export {name}={shlex.quote(v)}" for name, v in result["envs"].items()]


def engine_arguments(result: dict[str, Any]) -> str:
    """``--device``, ``-e`` and ``--mount`` arguments for ``docker run`` or ``podman run``."""
    words = []
    for device in result["devices"]:
        words += [
            "--device",
            f"{device['host_path']}:{device['task_path']}:{device['cgroup_perms']}",
        ]
    for name, v in result["envs"].items():
        words += ["-e", f"{name}={v}"]
    for mount in result["mounts"]:
        # --mount, not -v: paths such as /dev/dri/by-path/pci-0000:3b:00.0-card have colons
        spec = f"type=bind,source={mount['host_path']},target={mount['task_path']}"
        words += ["--mount", spec + (",readonly" if mount["read_only"] else "")]
    return shlex.join(words)


def cdi_arguments(names: list[str]) -> str:
    """``--device=KIND=ID`` for each CDI device name, for ``podman run $(...)``."""
    return " ".join(f"--device={name}" for name in names)


# The stats table's columns: heading, and the statistics shown in it (the first one given).
STATS_COLUMNS = (
    ("GPU", ("GPU utilization",)),
    ("MEM BW", ("Memory utilization",)),
    ("MEMORY MiB", ("Memory state", "Memory total")),
    ("TEMP C", ("Temperature",)),
    ("POWER W", ("Power usage",)),
    ("ENERGY J", ("Energy",)),
    ("CLOCK MHz", ("SM clock", "GPU frequency")),
    ("PCIe TX/RX KB/s", ("PCIe TX throughput", "PCIe RX throughput")),
    ("ECC", ("ECC volatile uncorrected", "ECC volatile corrected")),
    ("THROTTLE", ("Throttle reasons",)),
)


def _stat(found: dict[str, Any], name: str) -> str | None:
    entry = found.get(name)
    if entry is None:
        return None
    number = entry["value"]
    unit = entry.get("unit", "")
    if isinstance(number, float):
        number = f"{number:.1f}"
    return f"{number}{unit if unit == '%' else ''}"


def _stats_cell(found: dict[str, Any], heading: str, names: tuple[str, ...]) -> str:
    values = [_stat(found, name) for name in names]
    if heading == "CLOCK MHz":  # NVML's SM clock, or the kernel's GPU frequency
        return next((v for v in values if v is not None), "-")
    if heading == "ECC" and all(v is not None for v in values):
        return f"{values[0]} unc / {values[1]} cor"
    if heading == "THROTTLE":
        return "-" if values[0] is None else values[0] or "none"
    return "/".join(v if v is not None else "-" for v in values)


def stats_table(params: dict[str, Any]) -> str:
    """One ``stats`` sample as a table: a row per device, ``-`` where it gives no number."""
    when = time.strftime("%H:%M:%S", time.localtime(params["time"]))
    devices = params["devices"]
    if not devices:
        return f"{when}  no device gives statistics"
    rows = [["ID", *(heading for heading, _ in STATS_COLUMNS)]]
    for device_id, found in sorted(devices.items()):
        rows.append([device_id, *(_stats_cell(found, h, n) for h, n in STATS_COLUMNS)])
    return f"{when}\n{table(rows)}"
