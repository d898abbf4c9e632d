"""Attacks a local user could try against the daemon running as root, each performed for real:
other users are forked children that drop to uids no account has (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.serving import socketfile
from monitor.wire.errors import RpcError
from tests.conftest import (
    ALICE,
    BOB,
    GROUP,
    MALLORY,
    Daemon,
    as_user,
    call_as,
    cli_as,
    need,
)
from tests.reliability import record
from tests.sysfs import reservable
from tests.waiting import wait_until


def serve_refused(*args: str, env: dict[str, str] | None = None) -> str:
    """``serve`` that must stop at once with one error line and no traceback; that line."""
    command = [sys.executable, "-m", "monitor", "serve", "--no-nvml", "--log-target", "stderr"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("hotplug-monitor: error: "), done.stderr
    return last


def chown(path: Path, uid: int, mode: int) -> Path:
    """``path`` (a directory, made if missing) given to ``uid`` with ``mode``."""
    path.mkdir(exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


# --- 1. directories others can write: no symlink of theirs is ever followed -------------------


def test_directories_others_could_write_are_refused(tmp_path: Path, shared_tmp: Path) -> None:
    """Mallory plants symlinks to a root-only file where the daemon used to create its lease
    file's temporary, under every PID it may get; a state, CDI or socket directory anyone but
    root could write is refused, so nothing of Mallory's is ever written through."""
    target = tmp_path / "root-only"
    target.write_text("precious\n")
    target.chmod(0o600)
    mallorys = chown(shared_tmp / "mallorys", MALLORY, 0o755)
    planted = mallorys / "state"

    def plant() -> int:
        planted.mkdir()
        last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
        for pid in range(last + 1, last + 400):
            (planted / f".leases.json.{pid}.tmp").symlink_to(target)
        return last

    assert isinstance(as_user(MALLORY, [MALLORY], plant), int)
    world = tmp_path / "world"
    world.mkdir(mode=0o777)
    world.chmod(0o1777)  # sticky, like /tmp: others still create names in it
    below = chown(shared_tmp / "open-parent", MALLORY, 0o755)
    (below / "dir").mkdir()
    refused = []
    for flag, directory in [
        ("--state-dir", planted),
        ("--state-dir", world),
        ("--cdi-dir", world),
        ("--state-dir", below / "dir"),
    ]:
        args = ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "state")]
        args += ["--cdi-dir", str(tmp_path / "cdi")]  # never the host daemon's
        line = serve_refused(*args, flag, str(directory))
        assert f"refusing {directory}" in line, line
        refused.append(line)
    line = serve_refused(
        "--socket", str(world / "s.sock"), "--state-dir", str(tmp_path / "st"), "--no-cdi"
    )
    assert f"refusing {world}: others can write" in line
    assert target.read_text() == "precious\n" and target.stat().st_mode & 0o777 == 0o600
    record(
        "Security",
        "Symlinks planted where the lease file's temporary is made; state, CDI and socket "
        "directories others can write (owned by another user, mode 1777, below another "
        "user's directory)",
        f"399 symlinks to a root-only file; {len(refused) + 1} directories",
        "each directory refused at start in one line naming it and why; the root-only file "
        "unchanged",
    )


def test_the_socket_never_exists_with_another_mode_and_is_never_chmodded_by_name(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory, who may read the socket's directory, watches the socket's name while the daemon
    makes it again and again: it must never appear with another mode or group, and no chmod or
    chown may go through a name that could have been swapped."""
    directory = shared_tmp / "run"
    directory.mkdir(mode=0o755)
    path = directory / "monitor.sock"
    by_name: list[Any] = []
    for name in ("chmod", "chown", "lchown"):
        real = getattr(os, name)

        def spy(target: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            if kwargs.get("dir_fd") is None:
                by_name.append(target)
            return _real(target, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    read, write = os.pipe()

    def watch() -> dict[str, int]:
        seen = wrong = 0
        os.write(write, b"!")
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            seen += 1
            wrong += (stat.S_IMODE(st.st_mode), st.st_gid) != (0o660, GROUP)
        return {"seen": seen, "wrong": wrong}

    watcher = threading.Thread(target=lambda: results.append(as_user(MALLORY, [MALLORY], watch)))
    results: list[dict[str, int]] = []
    watcher.start()
    os.read(read, 1)
    binds = 0
    while watcher.is_alive():
        sock, _ = socketfile.bind_unix_socket(path, 0o660, GROUP)
        sock.close()  # stale now: the next bind replaces it
        path.unlink()
        binds += 1
    watcher.join()
    assert by_name == []
    assert results[0]["seen"] > 0 and results[0]["wrong"] == 0, results
    record(
        "Security",
        "The socket made again and again while another user watches its name (lstat in a loop)",
        f"{binds:,} binds, {results[0]['seen']:,} sightings",
        "never seen with another mode or group; no chmod or chown through a name",
    )


# --- 3. a socket where another user can pose as the daemon, and output for a shell ------------


def fake_daemon(path: Path, answers: dict[str, Any], calls: list[str]) -> Callable[[], None]:
    """A server at ``path`` answering each request on a connection with ``answers[method]``
    until the client hangs up, and appending each method to ``calls``; stop with the result."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    path.chmod(0o666)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as lines:
                for line in lines:
                    request = json.loads(line)
                    calls.append(request["method"])
                    result = answers[request["method"]]
                    reply = {"jsonrpc": "2.0", "id": request["id"], "result": result}
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join()

    return stop


@pytest.fixture
def fallback_dir() -> Iterator[Path]:
    """Alice's socket directory when she has no XDG_RUNTIME_DIR, as the CLI computes it."""
    path = Path(f"/tmp/hotplug-monitor-{ALICE}")
    subprocess.run(["rm", "-rf", str(path)], check=True)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def test_no_one_can_pose_as_alices_daemon_in_tmp(fallback_dir: Path, shared_tmp: Path) -> None:
    """Without XDG_RUNTIME_DIR (sudo -u, cron), Alice's own daemon lives in /tmp, where Mallory
    can create the directory first and serve a fake daemon in it."""
    chown(fallback_dir, MALLORY, 0o777)
    calls: list[str] = []
    fingerprint = {"generation": 1, "snapshot": {"groups": {}}}
    answers = {"fingerprint": fingerprint, "leases": {"leases": []}}
    stop = fake_daemon(fallback_dir / "hotplug-monitor.sock", answers, calls)
    home = chown(shared_tmp / "alice", ALICE, 0o700)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    try:
        status, _, err = cli_as(ALICE, [ALICE], ["devices"], env)
        assert status == 1 and "no daemon is running" in err, err
        assert calls == []  # the CLI never spoke to Mallory's daemon
        status, _, err = cli_as(ALICE, [ALICE], ["serve", "--no-nvml", "--no-cdi"], env)
        assert status == 1 and f"refusing {fallback_dir}" in err, err
        assert err.count("\n") <= 2 and "Traceback" not in err, err  # a log line, the error
    finally:
        stop()
    # Alice's own private directory there is hers to use
    subprocess.run(["rm", "-rf", str(fallback_dir)], check=True)
    chown(fallback_dir, ALICE, 0o700)
    stop = fake_daemon(fallback_dir / "hotplug-monitor.sock", answers, calls)
    try:
        status, out, err = cli_as(ALICE, [ALICE], ["devices", "--json"], env)
    finally:
        stop()
    assert status == 0 and calls == ["fingerprint", "leases"], (out, err)
    assert json.loads(out) == fingerprint
    record(
        "Security",
        "Another user's directory at the /tmp fallback socket path, with a fake daemon in it",
        "devices and serve run as the victim, without XDG_RUNTIME_DIR",
        "the client never connected to the fake; serve refused the directory in one line; the "
        "victim's own 0700 directory there is used",
    )


HOSTILE_RESERVATIONS: list[tuple[str, dict[str, Any], str]] = [
    ("--env", {"envs": {"X=1;id>PWNED;Y": "1"}}, "an environment variable name"),
    ("--docker-args", {"devices": [{"host_path": "/dev/mem"}]}, "a device node"),
    ("--docker-args", {"mounts": [{"host_path": "/", "read_only": False}]}, "a mount"),
    ("--docker-args", {"devices": [{"host_path": "/dev/dri/card0/../../mem"}]}, "a device node"),
    ("--cdi", {"device_ids": ["0000:3b:00.0;id>PWNED"]}, "an unexpected ID"),
]


def reservation(**changes: Any) -> dict[str, Any]:
    device = {"task_path": "/dev/dri/card0", "host_path": "/dev/dri/card0", "cgroup_perms": "rwm"}
    result: dict[str, Any] = {
        "reservation_id": "abc-1",
        "device_ids": ["0000:3b:00.0"],
        "envs": {"NVIDIA_VISIBLE_DEVICES": "GPU-1"},
        "mounts": [],
        "devices": [device],
    }
    for key, value in changes.items():
        if key == "devices":
            value = [{**device, **v} for v in value]
        elif key == "mounts":
            value = [{"task_path": v["host_path"], **v} for v in value]
        result[key] = value
    return result


def test_what_reserve_prints_for_a_shell_or_an_engine_is_checked(shared_tmp: Path) -> None:
    """A daemon Alice should not have trusted answers her reservation with names and paths
    meant for ``eval "$(hotplug-monitor reserve --env ...)"`` and ``docker run $(...)``."""
    work = chown(shared_tmp / "alice", ALICE, 0o700)
    sock = shared_tmp / "fake.sock"
    for output, changes, complaint in HOSTILE_RESERVATIONS:
        stop = fake_daemon(sock, {"reserve": reservation(**changes)}, [])
        try:
            argv = ["reserve", "--socket", str(sock), output, "0000:3b:00.0"]
            status, out, err = cli_as(ALICE, [ALICE], argv)
        finally:
            stop()
            sock.unlink()
        assert status == 1 and out == "", (output, out, err)
        assert f"refusing the daemon's reservation: {complaint}" in err, err
    # a value is data, whatever it holds: quoted, so eval runs nothing
    hostile = reservation(envs={"GPUS": "$(id>PWNED)`id>PWNED`'\""})
    stop = fake_daemon(sock, {"reserve": hostile}, [])
    try:
        argv = ["reserve", "--socket", str(sock), "--env", "0000:3b:00.0"]
        status, out, _ = cli_as(ALICE, [ALICE], argv)
    finally:
        stop()
    assert status == 0
    shown = subprocess.run(
        ["sh", "-c", 'eval "$1"; printf %s "$GPUS"', "sh", out],
        cwd=work,
        user=ALICE,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout == "$(id>PWNED)`id>PWNED`'\"" and not (work / "PWNED").exists()
    record(
        "Security",
        "A daemon answering reserve with shell syntax in env names and values, /dev/mem, a "
        "bind of /, a path climbing out of /dev/dri, an ID with a command in it",
        f"{len(HOSTILE_RESERVATIONS) + 1} answers to reserve --env, --docker-args and --cdi",
        "each refused in one line with nothing printed; a value with $(...) and backquotes "
        "printed quoted, and eval ran nothing",
    )


# --- 4. holder PIDs ---------------------------------------------------------------------------


@pytest.fixture
def shared_daemon(
    start_daemon: Callable[..., Daemon], shared_socket: Path
) -> tuple[Daemon, list[str]]:
    devices, flags = reservable()
    daemon = start_daemon(*flags, "--group", str(GROUP), socket=shared_socket)
    shared_socket.chmod(0o666)  # an operator opened it to all: outsiders may read
    return daemon, devices


def refusal(daemon: Daemon, params: dict[str, Any]) -> RpcError:
    with daemon.client() as client, pytest.raises(RpcError) as refused:
        client.call("reserve", params)
    return refused.value


def test_holder_pids_must_be_processes_of_this_host(
    shared_daemon: tuple[Daemon, list[str]],
) -> None:
    daemon, devices = shared_daemon
    threaded = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import threading, time\n"
            "t = threading.Thread(target=time.sleep, args=(60,)); t.start()\n"
            "print(t.native_id, flush=True); t.join()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    try:
        assert threaded.stdout is not None
        thread_id = int(threaded.stdout.readline())
        wanted = {"device_ids": [devices[0]]}
        refused = refusal(daemon, {**wanted, "holder_pid": thread_id})
        assert refused.code == -32602 and f"{thread_id} is a thread of process" in refused.message
        wait_until(
            lambda: Path(f"/proc/{zombie}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
            what="the child to become a zombie",
        )
        refused = refusal(daemon, {**wanted, "holder_pid": zombie})
        assert refused.code == -32602 and "zombie" in refused.message, refused.message
    finally:
        threaded.kill()
        threaded.wait()
        os.waitpid(zombie, 0)
    # from another PID namespace, a client's own PID (1 there) would name the host's init
    script = (
        "import json, os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "params = {'device_ids': [sys.argv[2]], 'holder_pid': os.getpid()}\n"
        "s.sendall(json.dumps({'jsonrpc': '2.0', 'id': 1, 'method': 'reserve',"
        " 'params': params}).encode() + b'\\n')\n"
        "print(os.getpid(), s.makefile().readline(), end='')\n"
    )
    inside = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script,
         str(daemon.socket), devices[0]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pid, answer = inside.stdout.split(" ", 1)
    assert pid == "1"
    error = json.loads(answer)["error"]
    assert error["code"] == -32602 and "another PID namespace" in error["message"]
    # an outsider learns nothing of which PIDs exist: refused before anything is looked up
    answers = [
        call_as(MALLORY, [MALLORY], daemon.socket, "reserve", {**wanted, "holder_pid": pid})
        for pid in (1, os.getpid(), (1 << 22) - 1)
    ]
    assert all(a["error"]["code"] == -32004 for a in answers), answers
    assert len({a["error"]["message"] for a in answers}) == 1
    assert daemon.client().call("leases") == {"leases": []}
    record(
        "Security",
        "holder_pid naming a thread, a zombie, PID 1 from a client in a PID namespace of its "
        "own; PIDs probed by a user outside the group",
        "3 bad holders; 3 PIDs probed (two that exist, one that does not)",
        "each bad holder refused with -32602 saying why; every probe refused alike with "
        "-32004 before any lookup; no lease granted",
    )


def hold(daemon: Daemon, device: str) -> tuple[subprocess.Popen[bytes], str]:
    holder = subprocess.Popen(["sleep", "120"])
    with daemon.client() as client:
        lease = client.call("reserve", {"device_ids": [device], "holder_pid": holder.pid})
    return holder, lease["reservation_id"]


def step_clock(seconds: float) -> None:
    try:
        time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME) + seconds)
    except PermissionError:
        need("needs CAP_SYS_TIME to step the wall clock")


def test_a_clock_step_while_stopped_keeps_living_holders_leases(
    start_daemon: Callable[..., Daemon],
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    holder, lease = hold(daemon, devices[0])
    try:
        daemon.stop()
        step_clock(+2.0)
        try:
            again = start_daemon(*flags)
        finally:
            step_clock(-2.0)
        leases = again.client().call("leases")["leases"]
        assert [e["reservation_id"] for e in leases] == [lease], again.log()
        holder.kill()
        holder.wait()
        with again.client() as client:
            wait_until(lambda: not client.call("leases")["leases"], 5, "the lease to end")
            assert client.call("leases") == {"leases": []}  # and it still ends with its holder
    finally:
        holder.kill()
        holder.wait()
    record(
        "Security",
        "The wall clock stepped 2 s forward between a stop and a start",
        "1 lease with a living holder",
        "the lease restored; it ended when its holder did",
    )


def test_a_reused_pid_does_not_keep_a_lease_across_a_restart(
    start_daemon: Callable[..., Daemon],
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    holder, lease = hold(daemon, devices[0])
    daemon.stop()
    holder.kill()
    holder.wait()
    time.sleep(1.2)  # within the 1.8 s a relative tolerance on epoch seconds used to allow
    impostor = None
    for _ in range(20):  # another process may fork between our write and ours
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(holder.pid - 1))
        impostor = subprocess.Popen(["sleep", "120"])
        if impostor.pid == holder.pid:
            break
        impostor.kill()
        impostor.wait()
    assert impostor is not None and impostor.pid == holder.pid, "could not reuse the PID"
    try:
        again = start_daemon(*flags)
        assert again.client().call("leases") == {"leases": []}
        assert f"reservation {lease} ends: its holder process {holder.pid} exited" in again.log()
    finally:
        impostor.kill()
        impostor.wait()
    record(
        "Security",
        "The holder's PID reused by a new process 1.2 s after the holder died, the daemon down",
        "1 lease",
        "the lease ended at start: the new process is not its holder",
    )


# --- 7. a hostile config file, at start and on SIGHUP ----------------------------------------


def test_a_hostile_config_never_ends_or_wedges_the_daemon(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("log_level = 'info'\n")
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    line = serve_refused("--config", str(deep), "--socket", str(tmp_path / "x.sock"))
    assert "nests tables or arrays too deeply" in line
    daemon = start_daemon("--config", str(config))
    mallorys = tmp_path / "mallorys.toml"
    mallorys.write_text("log_level = 'debug'\n")
    os.chown(mallorys, MALLORY, MALLORY)

    def planted(make: Callable[[], Any]) -> Callable[[], None]:
        def plant() -> None:
            config.unlink()
            make()

        return plant

    hostile: list[tuple[str, Callable[[], Any]]] = [
        ("nests tables or arrays too deeply", lambda: os.replace(deep, config)),
        ("is not a regular file", planted(lambda: os.mkfifo(config))),
        ("is not a regular file", planted(lambda: config.symlink_to("/dev/zero"))),
        ("is owned by uid", planted(lambda: config.symlink_to(mallorys))),
    ]
    rss = daemon.rss_mib()
    for done, (complaint, make) in enumerate(hostile, 1):
        make()
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: daemon.log().count("reload refused") >= done,  # noqa: B023 (called here)
            what=lambda: f"reload {done} refused:\n{daemon.log()}",  # noqa: B023
        )
        assert complaint in daemon.log().splitlines()[-1], daemon.log()
        assert daemon.fingerprint()["generation"] >= 0  # still answering
    assert daemon.rss_mib() < rss + 20
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()
    record(
        "Security",
        "Config files nested 100,000 deep, a FIFO, a symlink to /dev/zero, another user's file, "
        "at start and on SIGHUP",
        "1 start, 4 reloads",
        "start refused in one line; each reload refused in one log line, the daemon serving on "
        "with its configuration; RSS within 20 MiB; SIGTERM acted on at once",
    )


# --- 8. a lease file that parses but lies -----------------------------------------------------


def lease_entry(lease_id: str, device: str, **changes: Any) -> dict[str, Any]:
    return {
        "reservation_id": lease_id,
        "devices": {device: "nvidia/gpu/H100"},
        "uid": 0,
        "gid": 0,
        "pid": 1,
        "created": 1.0,
        "holder_pid": None,
        "holder_start": None,
        "holder_boot_id": None,
        **changes,
    }


def test_a_lease_file_that_parses_but_lies_is_not_trusted(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    devices, flags = reservable()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    leases = state / "leases.json"
    bad: list[tuple[str, Callable[[], Any]]] = [
        ("not a vendor/type/name", lambda: write([lease_entry("a", devices[0], devices={
            devices[0]: "no-slashes"})])),
        ("NaN is not a JSON value", lambda: leases.write_text(json.dumps({
            "version": 2, "leases": [lease_entry("a", devices[0])]}).replace("1.0", "NaN"))),
        ("not a PCI address", lambda: write([lease_entry("a", "../../etc")])),
        ("not a regular file", lambda: os.mkfifo(leases)),
        ("is a symbolic link", lambda: leases.symlink_to("/etc/hostname")),
    ]  # fmt: skip

    def write(entries: list[dict[str, Any]]) -> None:
        leases.write_text(json.dumps({"version": 2, "leases": entries}))

    for complaint, make in bad:
        for old in state.iterdir():
            old.unlink()
        make()
        daemon = start_daemon(*flags)
        assert daemon.client().call("leases") == {"leases": []}
        assert complaint in daemon.log() and "CRITICAL" in daemon.log(), daemon.log()
        assert list(state.glob("leases.json.corrupt-*")), list(state.iterdir())
        daemon.stop()
    for old in state.iterdir():
        old.unlink()
    write([lease_entry("first", devices[0]), lease_entry("second", devices[0])])
    daemon = start_daemon(*flags)
    assert [e["reservation_id"] for e in daemon.client().call("leases")["leases"]] == ["first"]
    assert f"reservations first and second both hold {devices[0]}" in daemon.log()
    status, out, err = cli_as(0, [0], ["leases", "--socket", str(daemon.socket)])
    assert status == 0 and "first" in out, err
    record(
        "Security",
        "Lease files that parse but lie: a group key without slashes, created NaN, a device ID "
        "that is a path, a FIFO, a symlink, two leases on one device",
        f"{len(bad) + 1} files",
        "each bad file set aside at start with a critical log line naming the fault; the "
        "second lease on a device dropped, naming both; leases listed without error",
    )


# --- 9. one user holding every connection -----------------------------------------------------


def test_one_user_cannot_keep_root_or_others_out(
    start_daemon: Callable[..., Daemon], shared_socket: Path
) -> None:
    daemon = start_daemon(
        "--group", str(GROUP), "--max-clients", "128", "--max-clients-per-uid", "16",
        "--client-timeout", "2", socket=shared_socket,
    )  # fmt: skip
    shared_socket.chmod(0o666)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def flood() -> dict[str, int]:
        """Mallory opens 200 connections, each with one byte of a request, and holds them."""
        held = []
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(shared_socket))
            sock.sendall(b"{")
            held.append(sock)
        os.write(ready_w, b"!")
        os.read(go_r, 1)
        closed = refused = 0
        for sock in held:
            sock.settimeout(10)
            answer = json.loads(sock.makefile("rb").readline())
            refused += "Too many connections from uid" in answer["error"]["message"]
            closed += "finished no request line for 2 s" in answer["error"]["message"]
        return {"refused": refused, "closed": closed}

    results: list[dict[str, int]] = []
    thread = threading.Thread(target=lambda: results.append(as_user(MALLORY, [GROUP], flood)))
    thread.start()
    os.read(ready_r, 1)
    try:
        assert daemon.fingerprint()["generation"] >= 0  # root gets in
        answer = call_as(ALICE, [ALICE], shared_socket, "fingerprint", {})
        assert "result" in answer, answer  # and so does another user
    finally:
        os.write(go_w, b"!")
        thread.join()
    assert results == [{"refused": 184, "closed": 16}], results
    # a connection that sends nothing is closed too; a subscriber that reads is not
    with daemon.client() as subscriber, socket.socket(socket.AF_UNIX) as idle:
        subscriber.call("subscribe")  # before the idle one connects: its 2 s are over first
        idle.connect(str(shared_socket))
        idle.settimeout(5)
        closed = json.loads(idle.makefile("rb").readline())  # the daemon closes it after 2 s
        assert "sent nothing for 2 s" in closed["error"]["message"], closed
        assert subscriber.call("fingerprint")["generation"] >= 0
    record(
        "Security",
        "One group member opening 200 connections, each holding a partial line",
        "200 connections (per-uid limit 16); root and another user connecting meanwhile",
        "184 refused with -32000, 16 closed after the 2 s timeout; root and the other user "
        "served; an idle connection closed, a reading subscriber kept",
    )


# --- 10. two daemons on one directory ---------------------------------------------------------


def test_a_second_daemon_on_the_same_state_or_cdi_directory_refuses(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    cdi = tmp_path / "cdi"
    first = start_daemon("--cdi-dir", str(cdi))
    spec = cdi / "hotplug-monitor.json"
    wait_until(spec.exists, 5, lambda: f"{spec}:\n{first.log()}")
    same_state = ["--socket", str(tmp_path / "b.sock"), "--state-dir", str(first.state_dir)]
    line = serve_refused(*same_state, "--no-cdi")
    assert f"is in use by another hotplug-monitor (pid {first.process.pid})" in line, line
    same_cdi = ["--socket", str(tmp_path / "c.sock"), "--state-dir", str(tmp_path / "other")]
    line = serve_refused(*same_cdi, "--cdi-dir", str(cdi))
    assert f"{cdi} is in use by another hotplug-monitor (pid {first.process.pid})" in line
    assert spec.exists() and first.fingerprint()["generation"] >= 0
    record(
        "Security",
        "A second daemon started on the state directory, then the CDI directory, of a running one",
        "2 daemons",
        "each refused at start in one line naming the running daemon's PID; its CDI spec kept",
    )


def test_a_bad_group_and_an_unreadable_home_are_one_line_errors(tmp_path: Path) -> None:
    here = ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "state")]
    line = serve_refused("--group", "99999999999", *here)
    assert "out of range" in line
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root"}  # Bob cannot read it
    status, _, err = cli_as(BOB, [BOB], ["serve", "--no-nvml"], env)
    assert status == 1 and err.startswith("hotplug-monitor: error: cannot look for the config")
    assert err.count("\n") == 1, err


# --- 11. owner names bound to identities (issue 24, item 1) -----------------------------------


def test_a_member_cannot_speak_for_an_owner_name_that_is_not_its_own(
    start_daemon: Callable[..., Daemon], shared_socket: Path
) -> None:
    """Alice, in the daemon's group, tries what any member could: release kubelet's leases,
    reconcile root's Nomad leases away, reserve as kubelet a device a pod holds (two users on one
    GPU), and end Bob's owner lease. Each is refused, naming the owner; nothing changes."""
    devices, flags = reservable()
    daemon = start_daemon("--group", str(GROUP), *flags, socket=shared_socket)
    pods = daemon.client().call("reserve", {"device_ids": [devices[0]], "owner": "kubelet"})
    bobs = call_as(BOB, [BOB, GROUP], shared_socket, "reserve",
                   {"device_ids": [devices[1]], "owner": "bobs-batch"})  # fmt: skip
    assert "result" in bobs, bobs
    attacks: list[tuple[str, dict[str, Any], str]] = [
        ("release", {"owner": "kubelet"}, "kubelet"),
        ("release", {"device_ids": [devices[0]], "owner": "kubelet"}, "kubelet"),
        ("reconcile", {"owner": "nomad", "device_ids": []}, "nomad"),
        ("reconcile", {"owner": "kubelet", "device_ids": []}, "kubelet"),
        ("reserve", {"device_ids": [devices[0]], "owner": "kubelet"}, "kubelet"),
        ("release", {"owner": "bobs-batch"}, "bobs-batch"),
        ("release", {"reservation_id": bobs["result"]["reservation_id"]}, "bobs-batch"),
        ("reserve", {"device_ids": [devices[1]], "owner": "bobs-batch"}, "bobs-batch"),
    ]
    for method, params, owner in attacks:
        answer = call_as(ALICE, [ALICE, GROUP], shared_socket, method, params)
        assert answer.get("error", {}).get("code") == -32004, (method, params, answer)
        assert f"owner name {owner} belongs to" in answer["error"]["message"], answer
    held = {lease["reservation_id"] for lease in daemon.client().call("leases")["leases"]}
    assert held == {pods["reservation_id"], bobs["result"]["reservation_id"]}
    record(
        "Security",
        "A group member using owner names that are not its own (kubelet, nomad, another's)",
        f"{len(attacks)} requests: release, reconcile and reserve as those owners",
        "each refused with -32004 naming the owner; every lease kept",
    )


# --- 12. a read-only group (issue 24) -----------------------------------------------------------

READERS = 4343  # a gid no account has


def test_the_read_only_group_reads_and_changes_nothing_and_outsiders_still_cannot_connect(
    start_daemon: Callable[..., Daemon], shared_socket: Path
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(
        "--group", str(GROUP), "--read-group", str(READERS), *flags, socket=shared_socket
    )
    assert stat.S_IMODE(shared_socket.stat().st_mode) == 0o660
    reader = [BOB, READERS]
    for method in ("fingerprint", "leases", "status"):
        assert "result" in call_as(BOB, reader, shared_socket, method, {}), method
    for method, params in (
        ("reserve", {"device_ids": [devices[0]]}),
        ("release", {"device_ids": [devices[0]]}),
        ("reconcile", {"owner": "nomad", "device_ids": []}),
    ):
        answer = call_as(BOB, reader, shared_socket, method, params)
        assert answer["error"]["code"] == -32004, answer
        assert "is in the daemon's read-only group" in answer["error"]["message"], answer
    outsider = call_as(MALLORY, [MALLORY], shared_socket, "fingerprint", {})
    assert "PermissionError" in outsider.get("child_error", ""), outsider
    assert daemon.client().call("leases") == {"leases": []}


# --- 13. one member flooding the journal (issue 24, item 5) ------------------------------------


def test_one_member_cannot_flood_the_journal_and_root_keeps_a_line_per_change(
    start_daemon: Callable[..., Daemon], shared_socket: Path
) -> None:
    """Alice loops over reserve and release as fast as she can while root reserves and releases
    twenty times: her changes beyond the limit are refused (-32000), the rest summarised about
    once a second; each of root's has its own line; the lease journal has every change."""
    devices, flags = reservable()
    daemon = start_daemon("--group", str(GROUP), *flags, socket=shared_socket)

    def loop() -> dict[str, int]:
        counts = {"granted": 0, "slow_down": 0}
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(shared_socket))
            lines = sock.makefile("rb")
            for n in range(300):
                method = "reserve" if n % 2 == 0 else "release"
                request = {"jsonrpc": "2.0", "id": n, "method": method,
                           "params": {"device_ids": [devices[1]]}}  # fmt: skip
                sock.sendall(json.dumps(request).encode() + b"\n")
                answer = json.loads(lines.readline())
                counts["granted"] += "reservation_id" in answer.get("result", {})
                error = answer.get("error", {})
                counts["slow_down"] += error.get("code") == -32000 and "slow down" in error.get(
                    "message", ""
                )
        return counts

    results: list[dict[str, int]] = []
    thread = threading.Thread(target=lambda: results.append(as_user(ALICE, [ALICE, GROUP], loop)))
    thread.start()
    roots = []
    with daemon.client() as client:
        for _ in range(20):
            roots.append(client.call("reserve", {"device_ids": [devices[0]]})["reservation_id"])
            client.call("release", {"device_ids": [devices[0]]})
    thread.join()
    [counts] = results
    assert counts["slow_down"] > 0 and counts["granted"] > 0, counts
    summary = f"uid {ALICE} made "  # the rest of her burst, within a second
    wait_until(lambda: summary in daemon.log(), 5, daemon.log)
    log = daemon.log()
    alices = [line for line in log.splitlines() if f"uid {ALICE}" in line]
    assert len(alices) <= 12, "\n".join(alices)  # one line, then a summary a second
    for lease in roots:
        assert f"reservation {lease} granted to uid 0" in log
        assert f"reservation {lease} released by uid 0" in log
    journal = (daemon.state_dir / "leases.journal").read_text()
    assert journal.count(f'"uid":{ALICE},') >= counts["granted"]
    record(
        "Security",
        "A group member reserving and releasing in a loop while root reserves",
        "300 requests of one member, 20 reserve/release of root's",
        f"{counts['slow_down']} refused with -32000; {len(alices)} log lines for the member's "
        "changes; every one of root's on its own line; each change in the lease journal",
    )
