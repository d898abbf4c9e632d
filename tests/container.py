"""Container Device Interface (CDI) helpers for the tests.

Two things live here:

* ``validate_cdi_spec`` checks a CDI spec (the JSON the daemon writes) against the
  official CDI JSON schema, stored unchanged under ``tests/data/cdi/`` (see the README
  there for its origin), plus the naming rules the CDI parser enforces and the schema
  does not.
* ``run_with_cdi`` runs a real container with podman and runc, asking for CDI devices
  from a spec directory, so a test can look at what the spec injects.

Podman on Debian 12 is 4.3.1, which has no ``--cdi-spec-dir`` option and no
``cdi_spec_dirs`` setting in containers.conf: it always reads ``/etc/cdi`` and
``/var/run/cdi``. So, where the option is missing, the command runs in a private mount
namespace (``unshare --mount``, needs root) with the spec directory bind-mounted over
``/etc/cdi``; the host's ``/etc/cdi`` is not touched beyond being created empty if it
was missing. Podman 4.3.1 carries CDI library 0.5.x and ignores specs whose
``cdiVersion`` is newer than 0.5.0 ("unresolvable CDI devices").

The daemon under test runs on simulated hardware, so its specs name host device nodes
(``/dev/nvidia1``, ``/dev/dri/card1``, ...) that do not exist here, and podman stats
those host paths to learn a node's type and major/minor. ``run_with_cdi`` can make such
nodes (``fake_nodes``) and symlinks (``fake_links``) for one run, visible only in the
private mount namespace podman, conmon and runc run in, never in the host's ``/dev``:

1. a tmpfs is mounted over ``/etc/cdi`` (the namespace's own mount) as a staging area;
2. ``cp -a --one-file-system /dev/. /etc/cdi/`` copies the real ``/dev``: device nodes
   (fresh inodes naming the same devices), symlinks (``fd``, ``stdin``, ...) and the
   directories, while the file systems mounted below ``/dev`` (``pts``, ``shm``,
   ``mqueue``, ...) are left out and only their (empty) mount point directories made;
3. each of those mounts is bound recursively (``mount --rbind /dev/shm /etc/cdi/shm``),
   so the copy shares devpts and the ``/dev/shm`` that podman's locks live in with the
   host;
4. the fake nodes (``mknod``) and links (``ln -s``) are made in the staging tmpfs;
5. ``mount --move /etc/cdi /dev`` puts it over the namespace's ``/dev``, and the spec
   directory is bound over ``/etc/cdi`` as before.

Everything lives in the namespace's mount table, which goes away with its last process
(conmon included), so a crash leaves nothing in the host's ``/dev``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema

CDI_KIND = "hotplug-monitor.io/gpu"
MINI_IMAGE = "localhost/mini"
BUSYBOX = Path("/bin/busybox")
SCHEMA_DIR = Path(__file__).parent / "data" / "cdi"

# Spec versions the CDI parser (specs-go/version.go on main) knows. Podman 4.3.1 only
# accepts up to 0.5.0.
KNOWN_CDI_VERSIONS = frozenset(
    {"0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0"}
)

# api/producer/identifiers.go, ValidateDeviceName: ASCII letters and digits, with '_',
# '-', '.' and ':' allowed inside; the first and the last character are a letter or a
# digit. So PCI addresses such as 0000:3b:00.0 are valid device names.
DEVICE_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?")
# validateVendorOrClassName: starts with a letter, ends with a letter or digit, with
# '_', '-' and '.' allowed inside.
VENDOR_OR_CLASS_RE = re.compile(r"[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")

_SCHEMA_URI = "file:///cdi-schema/schema.json"
_DEFS_URI = "file:///cdi-schema/defs.json"


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    """A draft-07 validator whose ``defs.json`` references resolve to the local copy."""
    resources: list[tuple[str, referencing.Resource[Any]]] = []
    for uri, name in ((_SCHEMA_URI, "schema.json"), (_DEFS_URI, "defs.json")):
        contents = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
        resource = referencing.Resource.from_contents(
            contents, default_specification=referencing.jsonschema.DRAFT7
        )
        resources.append((uri, resource))
    # No retrieve function: any reference outside these two files fails instead of
    # reaching for the network.
    registry: referencing.Registry[Any] = referencing.Registry().with_resources(resources)
    return jsonschema.Draft7Validator({"$ref": _SCHEMA_URI}, registry=registry)


def _name_error(message: str, path: list[str | int], value: object) -> jsonschema.ValidationError:
    return jsonschema.ValidationError(message, path=path, instance=value, validator="cdi-parser")


def validate_cdi_spec(spec: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``spec`` is a valid CDI spec.

    Checks the official JSON schema first (the most relevant error is raised), then what
    the CDI parser checks beyond it: the kind is ``vendor/class``, device names follow
    ``DEVICE_NAME_RE`` and are unique, and ``cdiVersion`` is a known version.
    """
    error = jsonschema.exceptions.best_match(_validator().iter_errors(spec))
    if error is not None:
        raise error

    version = spec["cdiVersion"]
    if version.removeprefix("v") not in KNOWN_CDI_VERSIONS:
        raise _name_error(f"unknown cdiVersion {version!r}", ["cdiVersion"], version)

    kind = spec["kind"]
    vendor, slash, cls = kind.partition("/")
    valid = VENDOR_OR_CLASS_RE.fullmatch
    if not slash or not valid(vendor) or not valid(cls):
        raise _name_error(f"invalid kind {kind!r}, want vendor/class", ["kind"], kind)

    seen: set[str] = set()
    for index, device in enumerate(spec["devices"]):
        name = device["name"]
        if not DEVICE_NAME_RE.fullmatch(name):
            raise _name_error(f"invalid device name {name!r}", ["devices", index, "name"], name)
        if name in seen:
            raise _name_error(f"duplicate device name {name!r}", ["devices", index, "name"], name)
        seen.add(name)


def qualified_name(name: str, kind: str = CDI_KIND) -> str:
    """The fully qualified CDI device name, ``vendor/class=name``."""
    return f"{kind}={name}"


# --- podman -------------------------------------------------------------------------


def _is_static_elf(path: Path) -> bool:
    """Whether ``path`` is a 64-bit little-endian ELF without a program interpreter."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    pt_interp = 3
    return all(
        struct.unpack_from("<I", data, phoff + i * phentsize)[0] != pt_interp for i in range(phnum)
    )


@functools.cache
def _podman_has_cdi_spec_dir() -> bool:
    help_text = subprocess.run(
        ["podman", "--help"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return "--cdi-spec-dir" in help_text


@functools.cache
def podman_missing() -> str | None:
    """Why podman cannot run CDI containers here, or None when it can."""
    for tool, package in (("podman", "podman"), ("runc", "runc")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if not _is_static_elf(BUSYBOX):
        return f"{BUSYBOX} is not a static binary (apt-get install busybox-static)"
    if not _podman_has_cdi_spec_dir():
        if os.geteuid() != 0:
            return "podman has no --cdi-spec-dir and binding a spec dir over /etc/cdi needs root"
        if shutil.which("unshare") is None:
            return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["podman", "--runtime", "runc", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        return f"podman info failed: {probe.stderr.strip()}"
    return None


@functools.cache
def fake_dev_missing() -> str | None:
    """Why ``run_with_cdi`` cannot make fake device nodes here, or None when it can."""
    if os.geteuid() != 0:
        return "fake device nodes need root (mknod in a private mount namespace)"
    for tool in ("unshare", "mknod", "cp"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _mini_rootfs_tar() -> bytes:
    """A tar of a root filesystem holding static busybox and a link per applet."""
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)

        for directory in ("bin", "dev", "etc", "mnt", "proc", "sys", "tmp"):
            add_dir(directory)
        binary = BUSYBOX.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(binary)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(binary))
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
    return buffer.getvalue()


def ensure_mini_image() -> None:
    """Import ``localhost/mini`` from the host's busybox unless podman already has it."""
    exists = subprocess.run(
        ["podman", "image", "exists", MINI_IMAGE], capture_output=True, timeout=60, check=False
    )
    if exists.returncode == 0:
        return
    subprocess.run(
        ["podman", "import", "--change", "CMD=/bin/sh", "-", MINI_IMAGE],
        input=_mini_rootfs_tar(),
        capture_output=True,
        timeout=120,
        check=True,
    )


def _podman_run_args(device_names: list[str], argv: list[str], kind: str) -> Iterator[str]:
    yield from ("--runtime", "runc", "run", "--rm", "--pull=never", "--network=none")
    yield from ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
    for name in device_names:
        yield from ("--device", qualified_name(name, kind))
    yield MINI_IMAGE
    yield from argv


def _dev_submounts() -> list[str]:
    """The outermost mount points below ``/dev`` in this mount namespace (``/dev/pts``...)."""
    points: set[str] = set()
    for line in Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines():
        raw = line.split()[4]
        # mountinfo escapes space, tab, newline and backslash as \ooo octal.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw)
        if point.startswith("/dev/"):
            points.add(point)
    return sorted(p for p in points if not any(p.startswith(q + "/") for q in points))


def _check_fake_path(path: str, submounts: list[str]) -> str:
    """``path`` relative to ``/dev``, or ``ValueError`` if it could reach outside the fake."""
    if not path.startswith("/dev/") or os.path.normpath(path) != path:
        raise ValueError(f"fake path {path!r} is not a normalised absolute path under /dev")
    for mount in submounts:
        if path == mount or path.startswith(mount + "/"):
            raise ValueError(f"fake path {path!r} is on {mount}, which is shared with the host")
    # The staging copy mirrors the host's /dev; a symlink among the parents would lead
    # mkdir -p or mknod out of it.
    parent = os.path.dirname(path)
    while parent != "/dev":
        if os.path.islink(parent):
            raise ValueError(f"fake path {path!r} goes through the symlink {parent}")
        parent = os.path.dirname(parent)
    return path.removeprefix("/dev/")


def fake_dev_script(
    fake_nodes: Mapping[str, tuple[int, int]], fake_links: Mapping[str, str]
) -> str:
    """Shell lines that put a copy of ``/dev`` with the fake entries over ``/dev``.

    Meant for a private mount namespace (see the module docstring); they leave
    ``/etc/cdi`` as an empty tmpfs mount point for the spec directory.
    """
    submounts = _dev_submounts()
    stage = "/etc/cdi"
    # One command a line: "set -e" does not stop at a failure inside an "a && b" list.
    lines = [
        "set -eu",
        f"mkdir -p {stage}",
        f"mount -t tmpfs -o mode=0755,size=16m hotplug-monitor-fake-dev {stage}",
        f"cp -a --one-file-system /dev/. {stage}/",
    ]
    for mount in submounts:
        target = shlex.quote(f"{stage}/{mount.removeprefix('/dev/')}")
        lines += [f"mkdir -p {target}", f"mount --rbind {shlex.quote(mount)} {target}"]
    for path in fake_links:
        if any(other.startswith(path + "/") for other in [*fake_nodes, *fake_links]):
            raise ValueError(f"fake link {path!r} is also the parent of another fake path")
    # (path relative to /dev, command before the path, command after it)
    entries: list[tuple[str, str, str]] = []
    for path, (major, minor) in fake_nodes.items():
        relative = _check_fake_path(path, submounts)
        entries.append((relative, "mknod -m 0666", f"c {int(major)} {int(minor)}"))
    for path, target in fake_links.items():
        entries.append((_check_fake_path(path, submounts), f"ln -s -- {shlex.quote(target)}", ""))
    for relative, head, tail in entries:
        quoted = shlex.quote(f"{stage}/{relative}")
        parent = shlex.quote(os.path.dirname(f"{stage}/{relative}"))
        lines += [f"mkdir -p {parent}", f"rm -f {quoted}", f"{head} {quoted} {tail}".rstrip()]
    lines.append(f"mount --move {stage} /dev")
    return "\n".join(lines) + "\n"


def run_with_cdi(
    spec_dir: Path,
    device_names: list[str],
    argv: list[str],
    timeout: float = 60,
    *,
    fake_nodes: Mapping[str, tuple[int, int]] | None = None,
    fake_links: Mapping[str, str] | None = None,
    kind: str = CDI_KIND,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a ``localhost/mini`` container with CDI devices from ``spec_dir``.

    ``device_names`` are the bare names (``0000:3b:00.0``); they are asked for as
    ``KIND=NAME``, by default ``hotplug-monitor.io/gpu=NAME``. Returns the finished process,
    stdout and stderr as text; a non-zero exit status is not an error here.

    ``fake_nodes`` maps absolute paths under ``/dev`` to the (major, minor) of a
    character device, ``fake_links`` paths under ``/dev`` to symlink targets; both are
    made only in podman's private mount namespace (see the module docstring), which
    needs root. A fake path may replace a real node but not lie on a file system mounted
    below ``/dev`` (``/dev/shm``...) or go through a symlink (``ValueError``).
    """
    reason = podman_missing()
    if reason is not None:
        raise RuntimeError(reason)
    fakes = bool(fake_nodes or fake_links)
    if fakes:
        reason = fake_dev_missing()
        if reason is not None:
            raise RuntimeError(reason)
    ensure_mini_image()
    run_args = list(_podman_run_args(device_names, argv, kind))
    spec_dir = spec_dir.resolve()
    if _podman_has_cdi_spec_dir() and not fakes:
        command = ["podman", "--cdi-spec-dir", str(spec_dir), *run_args]
    else:
        script = fake_dev_script(fake_nodes or {}, fake_links or {}) if fakes else ""
        script += 'mkdir -p /etc/cdi && mount --bind "$1" /etc/cdi && shift && exec podman "$@"'
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(spec_dir),
            *run_args,
        ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# busybox "ls -l": type and mode, links, owner, group, "major, minor", date, name.
LS_NODE_RE = re.compile(
    r"(?P<type>\S)\S*\s+\d+\s+\S+\s+\S+\s+(?P<major>\d+),\s*(?P<minor>\d+)\s.*\s(?P<name>\S+)"
)


def char_devices(listing: str) -> dict[str, tuple[int, int]]:
    """The character devices a busybox ``ls -l`` listed: name -> (major, minor)."""
    found = {}
    for line in listing.splitlines():
        match = LS_NODE_RE.fullmatch(line)
        if match and match["type"] == "c":
            found[match["name"]] = (int(match["major"]), int(match["minor"]))
    return found


def host_dev_snapshot() -> tuple[list[tuple[str, int, int]], str]:
    """The host's /dev entries (name, file type, rdev) and this process's mount table."""
    entries = []
    for name in sorted(os.listdir("/dev")):
        info = os.lstat(f"/dev/{name}")
        entries.append((name, info.st_mode & 0o170000, info.st_rdev))
    return entries, Path("/proc/self/mountinfo").read_text(encoding="utf-8")
