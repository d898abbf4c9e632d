"""The plugin side of HashiCorp go-plugin over gRPC, for a Python process, on grpc.aio.

Nomad starts an external plugin as a child process and talks to it through go-plugin's client.
What that client expects of the child (facts from hashicorp/go-plugin's server, client and
docs, and Nomad's plugins/base):

- the magic cookie in the environment (``NOMAD_PLUGIN_MAGIC_COOKIE``); without it the process
  was started by a person, not by Nomad, and says so in one line;
- ``PLUGIN_PROTOCOL_VERSIONS``, the application protocol versions the host speaks (Nomad: 2);
  the plugin answers with the highest one it shares, or its own lowest so that the host can
  name the mismatch;
- a Unix socket, in ``PLUGIN_UNIX_SOCKET_DIR`` when set (with ``PLUGIN_UNIX_SOCKET_GROUP``'s
  group when set), serving gRPC; ours is 0600 (0660 with a group) whatever the umask;
- exactly one stdout line, ``CORE|APP|unix|<socket>|grpc``; with ``PLUGIN_MULTIPLEX_GRPC``
  set, a sixth (server certificate, empty) and a seventh field saying whether brokered
  connections can be multiplexed (no: this side serves no broker);
- on the socket: ``grpc.health.v1.Health`` with service ``plugin`` SERVING (the host's Ping),
  ``plugin.GRPCController/Shutdown`` (the host's Kill: answer, then exit, or be killed after
  2 s) and ``plugin.GRPCStdio`` (newer hosts mirror output through it);
- logs on stderr as JSON lines with ``@level``, ``@message`` and ``@timestamp``, which the
  host re-logs at that level under the plugin's name; anything else on stderr is logged at
  debug level, and anything on stdout before the handshake line breaks the handshake.

The plugin's own services (Nomad's BasePlugin and DevicePlugin) come in as registrars,
one per gRPC service, so that this module knows nothing of devices or of our daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import grp
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import grpc
from google.protobuf import empty_pb2
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor.adapters.nomad.protos import goplugin_pb2, goplugin_pb2_grpc
from monitor.wire.private_socket import bound_privately

CORE_PROTOCOL_VERSION = 1
# go-plugin's GRPCServiceName: the service its client's Ping asks the health service about.
HEALTH_SERVICE = "plugin"

ENV_PROTOCOL_VERSIONS = "PLUGIN_PROTOCOL_VERSIONS"
ENV_UNIX_SOCKET_DIR = "PLUGIN_UNIX_SOCKET_DIR"
ENV_UNIX_SOCKET_GROUP = "PLUGIN_UNIX_SOCKET_GROUP"
ENV_MULTIPLEX_GRPC = "PLUGIN_MULTIPLEX_GRPC"
ENV_CLIENT_CERT = "PLUGIN_CLIENT_CERT"

# hclog's trace level, below logging.DEBUG.
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

# sun_path is 108 bytes on Linux, with the terminating NUL.
MAX_SOCKET_PATH = 107

Registrar = Callable[[grpc.aio.Server], None]
"""Adds one servicer to the server, e.g. ``partial(add_BasePluginServicer_to_server, impl)``.
Registrars run inside the event loop, before serving starts, so they may also start tasks
(a daemon client) or add signal handlers."""

log = logging.getLogger("goplugin")


@attrs.frozen
class Handshake:
    """What a host and its plugins agree on before any RPC."""

    cookie_key: str
    cookie_value: str
    protocol_versions: tuple[int, ...]
    # Said in one line on stderr when the cookie is missing (a person ran the binary).
    not_a_host_hint: str


NOMAD = Handshake(
    # Key, value and protocol version as in Nomad's plugins/base Handshake.
    cookie_key="NOMAD_PLUGIN_MAGIC_COOKIE",
    cookie_value="e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255",
    protocol_versions=(2,),
    not_a_host_hint=(
        "This is a HashiCorp Nomad device plugin and is started by the Nomad client, not by "
        "hand: put it (or a link to it) in the client's plugin_dir and add a "
        'plugin "<name>" block to the client configuration, then restart the Nomad client.'
    ),
)


class PluginStartError(Exception):
    """The plugin cannot serve (socket, group, TLS request); the message says why."""


def cookie_present(handshake: Handshake, env: Mapping[str, str]) -> bool:
    return env.get(handshake.cookie_key) == handshake.cookie_value


def offered_versions(offered: str | None) -> frozenset[int]:
    """The versions in PLUGIN_PROTOCOL_VERSIONS ("1,2"); unparsable entries are skipped."""
    versions: set[int] = set()
    for part in (offered or "").split(","):
        with contextlib.suppress(ValueError):
            versions.add(int(part.strip()))
    return frozenset(versions)


def negotiate_version(offered: str | None, supported: Sequence[int]) -> int:
    """The highest version in both lists, else our lowest (go-plugin's rule: the host then
    reports the incompatibility, naming both sides' versions)."""
    if not supported:
        raise ValueError("a plugin must speak at least one protocol version")
    common = offered_versions(offered).intersection(supported)
    return max(common) if common else min(supported)


def handshake_line(version: int, socket_path: str, *, multiplex_asked: bool) -> str:
    """The one line go-plugin's client reads from the plugin's stdout (without newline)."""
    fields = [str(CORE_PROTOCOL_VERSION), str(version), "unix", socket_path, "grpc"]
    if multiplex_asked:
        # Only a host that sets PLUGIN_MULTIPLEX_GRPC reads past the fifth field: an empty
        # certificate (no automatic mTLS), then "false": no broker, so nothing to multiplex.
        fields += ["", "false"]
    return "|".join(fields)


def _hclog_level(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    if levelno >= logging.INFO:
        return "info"
    if levelno >= logging.DEBUG:
        return "debug"
    return "trace"


# Attributes every LogRecord has; the others came from ``extra=`` and become key/value pairs.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class HclogJsonFormatter(logging.Formatter):
    """One JSON object per record in hclog's JSON shape.

    go-plugin's client parses ``@timestamp`` with the layout ``2006-01-02T15:04:05.000000Z07:00``
    (microseconds, then ``Z`` or an offset) and treats a line it cannot parse as plain text at
    debug level, so the timestamp is always UTC with six fractional digits.
    """

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        entry: dict[str, Any] = {
            "@level": _hclog_level(record.levelno),
            "@message": record.getMessage(),
            "@module": record.name,
            "@timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(stream: TextIO | None = None, level: int = TRACE) -> None:
    """Send every log record to ``stream`` (stderr) as hclog JSON; the host filters levels."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(HclogJsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # grpc and asyncio narrate every call at debug level: that is noise in the Nomad log.
    for chatty in ("grpc", "asyncio"):
        logging.getLogger(chatty).setLevel(max(level, logging.INFO))
    # A host that went away leaves stderr broken: don't print tracebacks about the logging.
    logging.raiseExceptions = False


class ControllerServicer(goplugin_pb2_grpc.GRPCControllerServicer):
    """plugin.GRPCController: Shutdown answers first and stops the server once the answer
    is out, so that the host's Kill sees a clean exit instead of waiting 2 s to kill."""

    def __init__(self, on_shutdown: Callable[[str], None]) -> None:
        self._on_shutdown = on_shutdown

    async def Shutdown(
        self,
        request: goplugin_pb2.Empty,
        context: grpc.aio.ServicerContext[goplugin_pb2.Empty, goplugin_pb2.Empty],
    ) -> goplugin_pb2.Empty:
        # typeshed declares the callback as a class no function matches; any callable works.
        context.add_done_callback(self._answered)  # type: ignore[arg-type]
        return goplugin_pb2.Empty()

    def _answered(self, context: object) -> None:
        self._on_shutdown("the host asked to shut down")


class StdioServicer(goplugin_pb2_grpc.GRPCStdioServicer):
    """plugin.GRPCStdio: nothing to mirror (stdout is kept for the handshake and logs go to
    stderr directly), so the stream stays open and empty until the plugin stops."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping

    async def StreamStdio(
        self,
        request: empty_pb2.Empty,
        context: grpc.aio.ServicerContext[empty_pb2.Empty, goplugin_pb2.StdioData],
    ) -> AsyncIterator[goplugin_pb2.StdioData]:
        await self._stopping.wait()
        return
        yield  # an async generator that yields nothing


def _socket_group(name: str) -> int:
    """A group name or number, as go-plugin's PLUGIN_UNIX_SOCKET_GROUP accepts."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise PluginStartError(f"{ENV_UNIX_SOCKET_GROUP}={name}: no such group") from None


class PluginServer:
    """One gRPC server on a Unix socket with go-plugin's own services and the plugin's.

    Use ``await start()``, print ``handshake()`` on stdout, then ``await wait_stopped()``;
    ``request_stop()`` (Shutdown, SIGTERM) ends it. ``stopping`` is set when the end begins,
    for servicers whose streams should finish by themselves.
    """

    def __init__(
        self,
        registrars: Iterable[Registrar],
        *,
        handshake: Handshake = NOMAD,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._registrars = list(registrars)
        self._handshake = handshake
        self._env = dict(os.environ if env is None else env)
        self.version = negotiate_version(
            self._env.get(ENV_PROTOCOL_VERSIONS), handshake.protocol_versions
        )
        self.stopping = asyncio.Event()
        self.stop_reason = ""
        self._server: grpc.aio.Server | None = None
        self._private_dir: Path | None = None
        self.socket_path = ""

    def _choose_socket_path(self) -> str:
        shared = self._env.get(ENV_UNIX_SOCKET_DIR, "")
        if shared:
            # go-plugin names the socket uniquely inside the host's directory.
            fd, name = tempfile.mkstemp(prefix="plugin", dir=shared)
            os.close(fd)
            os.unlink(name)
            path = name
        else:
            self._private_dir = Path(tempfile.mkdtemp(prefix="nomad-plugin-"))
            path = str(self._private_dir / "plugin.sock")
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise PluginStartError(f"socket path too long for a Unix socket: {path}")
        return path

    async def start(self) -> str:
        """Bind, register every service, start serving; return the socket path."""
        if self._env.get(ENV_CLIENT_CERT):
            # The host would speak TLS and fail to connect; say why instead.
            raise PluginStartError(
                "the host asked for automatic mTLS (PLUGIN_CLIENT_CERT), which this plugin "
                "does not support; leave AutoMTLS off for it"
            )
        offered = self._env.get(ENV_PROTOCOL_VERSIONS, "")
        if offered and self.version not in offered_versions(offered):
            log.warning(
                "no protocol version in common with the host",
                extra={
                    "host_versions": offered,
                    "plugin_versions": list(self._handshake.protocol_versions),
                },
            )
        self.socket_path = self._choose_socket_path()
        server = grpc.aio.server()
        health = health_async.HealthServicer()
        await health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        goplugin_pb2_grpc.add_GRPCControllerServicer_to_server(
            ControllerServicer(self.request_stop), server
        )
        goplugin_pb2_grpc.add_GRPCStdioServicer_to_server(StdioServicer(self.stopping), server)
        for register in self._registrars:
            register(server)
        group = self._env.get(ENV_UNIX_SOCKET_GROUP, "")
        gid = _socket_group(group) if group else None
        self._server = server  # stopped by close(), whatever happens below
        try:
            # Whoever may connect may ask for devices: the socket has its mode (0600, or 0660
            # for the host's group) from the moment its name exists, whatever the umask.
            with bound_privately(
                Path(self.socket_path), 0o600 if gid is None else 0o660, gid
            ) as at:
                if server.add_insecure_port(f"unix:{at}") == 0:
                    raise PluginStartError(f"cannot listen on {self.socket_path}")
                await server.start()
        except (OSError, RuntimeError) as error:
            why = error.strerror if isinstance(error, OSError) else None
            raise PluginStartError(f"cannot listen on {self.socket_path}: {why or error}") from None
        log.debug("plugin serving", extra={"address": self.socket_path, "version": self.version})
        return self.socket_path

    def handshake(self) -> str:
        return handshake_line(
            self.version, self.socket_path, multiplex_asked=bool(self._env.get(ENV_MULTIPLEX_GRPC))
        )

    def request_stop(self, reason: str) -> None:
        """Begin stopping (idempotent); safe from callbacks and signal handlers."""
        if not self.stopping.is_set():
            self.stop_reason = reason
            self.stopping.set()

    async def wait_stopped(self) -> None:
        """Wait for a stop request, then stop serving and remove the socket."""
        await self.stopping.wait()
        log.debug("plugin stopping", extra={"reason": self.stop_reason})
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            # Shutdown's answer is already out (its done callback asked for this): end the
            # other calls, streams included, at once rather than waiting for them.
            await self._server.stop(None)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            if self.socket_path:
                os.unlink(self.socket_path)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


def _watch_signals(server: PluginServer) -> None:
    loop = asyncio.get_running_loop()
    # A Ctrl-C at the Nomad agent's terminal reaches its plugins too; like go-plugin's own
    # servers, leave the decision to the host, which calls Shutdown.
    loop.add_signal_handler(
        signal.SIGINT, lambda: log.debug("interrupt ignored: the host stops its plugins")
    )
    loop.add_signal_handler(signal.SIGTERM, server.request_stop, "SIGTERM")


async def serve(
    registrars: Iterable[Registrar],
    *,
    handshake: Handshake = NOMAD,
    env: Mapping[str, str] | None = None,
    announce: Callable[[str], None],
) -> PluginServer:
    """Serve until the host shuts the plugin down; ``announce`` prints the handshake line.

    Returns the stopped server (its ``stop_reason`` says why). Raises PluginStartError.
    """
    server = PluginServer(registrars, handshake=handshake, env=env)
    try:
        await server.start()
        _watch_signals(server)
        announce(server.handshake())
        await server.wait_stopped()
    finally:
        await server.close()
    return server


def _keep_stdout_for_handshake() -> Callable[[str], None]:
    """Point fd 1 at stderr, so that nothing (a print, a C library) can write to the host's
    stdout pipe, and return a writer for the handshake line on the original stdout."""
    sys.stdout.flush()
    handshake_fd = os.dup(1)
    os.dup2(2, 1)

    def announce(line: str) -> None:
        os.write(handshake_fd, (line + "\n").encode())

    return announce


def main(
    registrars: Iterable[Registrar],
    *,
    handshake: Handshake = NOMAD,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run a plugin process: check the cookie, guard stdout, log as hclog, serve. Returns
    the exit status: 0 after the host's Shutdown (or SIGTERM), 1 when it cannot start."""
    environment = os.environ if env is None else env
    if not cookie_present(handshake, environment):
        print(handshake.not_a_host_hint, file=sys.stderr)
        return 1
    announce = _keep_stdout_for_handshake()
    configure_logging()
    try:
        asyncio.run(serve(registrars, handshake=handshake, env=environment, announce=announce))
    except PluginStartError as error:
        log.error(str(error))
        return 1
    except Exception:
        # One JSON line at error level, which Nomad shows, rather than a bare traceback.
        log.exception("plugin failed")
        return 1
    return 0
