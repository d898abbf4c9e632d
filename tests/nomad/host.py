"""Build and drive tests/nomad/host, a go-plugin host that launches Nomad device plugins the
way the Nomad client does, with go-plugin's real client from Debian's packages.

The build runs in GOPATH mode against Debian's Go packages (no module proxy): Go stubs are
generated from our protos into a temporary GOPATH, next to a copy of the host's sources.
The binary is kept in a cache directory under a hash of everything that goes into it, so a
second run (or a second test session) starts at once.

Commands (one JSON object per line; each answers one JSON line, errors as
``{"error": ..., "code": ...}``):

- ``launch`` ``{"cmd": [...], "env": {...}, "dir": ..., "config": {...}}``: the three launches
  of Nomad's loader; the last one stays up. Result: ``stages`` with their times.
- ``ping``, ``plugin_info``, ``config_schema``, ``set_config`` ``{"config"}`` (or
  ``{"raw_msgpack_b64"}``), ``reserve`` ``{"ids"}``, on the long-lived launch;
- ``fingerprint_next`` / ``stats_next`` ``{"timeout_ms", "interval_ms"}``: the next message of
  the open stream (opened on first use), with ``received_unix_ns``; ``*_cancel`` ends it;
- ``kill``: go-plugin's Kill, with ``kill_ms``; ``logs``: go-plugin's log lines since the last
  call (``host_log``, hclog JSON) and the plugin's raw stderr lines.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs

from tests.conftest import need

REPO = Path(__file__).resolve().parents[2]
HOST_SOURCES = Path(__file__).resolve().parent / "host"
PROTO_DIR = REPO / "monitor" / "adapters" / "nomad" / "protos"
# The host needs these (goplugin.proto is served by go-plugin's own client code).
GO_PROTOS = ("hclspec", "structs", "base", "device")
# The import path the protos' go_package lines put the stubs under.
GO_IMPORT_ROOT = "hotplugmonitor"
DEBIAN_GOPATH = Path("/usr/share/gocode")
GO_PLUGIN_PACKAGE = DEBIAN_GOPATH / "src/github.com/hashicorp/go-plugin"
APT_PACKAGES = (
    "golang-go golang-github-hashicorp-go-plugin-dev golang-google-grpc-dev "
    "golang-github-golang-protobuf-1-5-dev golang-google-protobuf-dev "
    "protobuf-compiler libprotobuf-dev protoc-gen-go protoc-gen-go-grpc"
)
WELL_KNOWN_PROTOS = Path("/usr/include/google/protobuf")


def missing_tools() -> str | None:
    """Why the host cannot be built here, or None."""
    for tool in ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install {APT_PACKAGES})"
    if not (WELL_KNOWN_PROTOS / "duration.proto").is_file():
        return f"no well-known protos in {WELL_KNOWN_PROTOS} (apt-get install libprotobuf-dev)"
    if not GO_PLUGIN_PACKAGE.is_dir():
        return f"go-plugin sources missing in {GO_PLUGIN_PACKAGE} (apt-get install {APT_PACKAGES})"
    return None


def _tool_version(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def source_hash() -> str:
    """A key for everything the binary is made of: sources, protos and the toolchain."""
    digest = hashlib.sha256()
    inputs = sorted(HOST_SOURCES.glob("*.go")) + [PROTO_DIR / f"{n}.proto" for n in GO_PROTOS]
    for path in inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(_tool_version("go", "version").encode())
    digest.update(_tool_version("protoc", "--version").encode())
    digest.update(str(sorted(p.name for p in GO_PLUGIN_PACKAGE.glob("*.go"))).encode())
    return digest.hexdigest()[:20]


@attrs.frozen
class Build:
    binary: Path
    seconds: float
    cached: bool


def build(cache_dir: Path) -> Build:
    """The host binary for the current sources: from the cache, or built now (once per key,
    also across concurrent sessions, through a lock file)."""
    began = time.monotonic()
    cache_dir = cache_dir.resolve()  # GOPATH entries must be absolute
    cache_dir.mkdir(parents=True, exist_ok=True)
    binary = cache_dir / f"nomad-host-{source_hash()}"
    with (cache_dir / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return Build(binary, time.monotonic() - began, cached=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="build-") as tmp:
            work = Path(tmp)
            src = work / "gopath" / "src"
            src.mkdir(parents=True)
            protos = [str((PROTO_DIR / f"{n}.proto").relative_to(REPO)) for n in GO_PROTOS]
            _run(
                [
                    "protoc",
                    f"--proto_path={REPO}",
                    "--proto_path=/usr/include",
                    f"--go_out={src}",
                    f"--go-grpc_out={src}",
                    *protos,
                ],
                cwd=REPO,
            )
            package = src / GO_IMPORT_ROOT / "nomadhost"
            package.mkdir(parents=True)
            for source in HOST_SOURCES.glob("*.go"):
                shutil.copy2(source, package / source.name)
            env = {
                **os.environ,
                "GO111MODULE": "off",
                "GOPATH": f"{work / 'gopath'}:{DEBIAN_GOPATH}",
                "GOCACHE": str(cache_dir / "gocache"),
                "GOFLAGS": "",
                "CGO_ENABLED": "0",
            }
            built = work / "host"
            _run(["go", "build", "-o", str(built), f"{GO_IMPORT_ROOT}/nomadhost"], env=env)
            os.replace(built, binary)
        for old in cache_dir.glob("nomad-host-*"):
            if old != binary:
                old.unlink()  # built from sources that have changed since
    return Build(binary, time.monotonic() - began, cached=False)


@functools.cache
def for_tests() -> Build:
    """The host for this test session: built into build/nomad-host (or $NOMAD_HOST_CACHE) if
    its sources changed, else taken from there. Skips the test (fails it under CI) when Go or
    go-plugin is missing."""
    need(missing_tools())
    return build(Path(os.environ.get("NOMAD_HOST_CACHE", REPO / "build" / "nomad-host")))


def _run(command: Sequence[str], **kwargs: Any) -> None:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


class HostError(Exception):
    """The host process died or did not answer."""


class GoPluginHost:
    """The host process; ``request`` sends one command and returns its JSON result."""

    def __init__(self, binary: Path, env: Mapping[str, str] | None = None) -> None:
        self._process = subprocess.Popen(
            [str(binary)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ if env is None else env),
            cwd=REPO,
        )
        self._results: queue.Queue[bytes] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_results, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_results(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._results.put(line)
        self._results.put(b"")

    def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip("\n"))

    def request(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        self._process.stdin.flush()
        try:
            line = self._results.get(timeout=timeout)
        except queue.Empty:
            raise HostError(f"no answer to {op} within {timeout} s") from None
        if not line:
            raise HostError(f"host exited during {op}: {' | '.join(self.stderr[-5:])}")
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        """End the host (it kills a plugin still running) and wait for it."""
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> GoPluginHost:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
