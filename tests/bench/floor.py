"""The floor for scenario 5: a bare trio JSON-RPC server on a Unix socket, answering the same
reserve and release lines with the least work a server can do for them.

``python -m tests.bench.floor SOCKET --disk none|thread|inline [--file PATH]``: each request is
parsed and answered; with ``thread``, first appended to PATH and ``fdatasync``ed in a worker
thread (what a durable server on trio must at least do), with ``inline``, the same on the event
loop. It decides nothing and keeps no state: whatever the daemon does beyond this is its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import trio


def append(fd: int, line: bytes) -> None:
    os.write(fd, line + b"\n")
    os.fdatasync(fd)


Write = Callable[[bytes], Awaitable[None]]


async def handle(stream: trio.SocketStream, write: Write | None) -> None:
    pending = b""
    serial = 0
    async with stream:
        while data := await stream.receive_some(65536):
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                request = json.loads(line)
                if write is not None:
                    await write(line)
                serial += 1
                if request["method"] == "reserve":
                    result = {"reservation_id": f"r{serial}", "devices": []}
                else:
                    result = {"released": request["params"]["reservation_id"]}
                answer = {"jsonrpc": "2.0", "id": request["id"], "result": result}
                await stream.send_all(json.dumps(answer).encode() + b"\n")


async def serve(path: str, disk: str, file: str | None) -> None:
    write: Write | None = None
    if disk != "none":
        assert file is not None, "--file is needed with a disk"
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

        async def in_thread(line: bytes) -> None:
            await trio.to_thread.run_sync(append, fd, line)

        async def inline(line: bytes) -> None:
            append(fd, line)

        write = in_thread if disk == "thread" else inline

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    print("ready", flush=True)
    await trio.serve_listeners(partial(handle, write=write), [trio.SocketListener(sock)])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floor")
    parser.add_argument("socket")
    parser.add_argument("--disk", choices=["none", "thread", "inline"], default="none")
    parser.add_argument("--file")
    args = parser.parse_args()
    trio.run(serve, args.socket, args.disk, args.file)


if __name__ == "__main__":
    main()
