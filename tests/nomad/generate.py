"""Generate the Python code for the Nomad plugin's protos, or check that the committed code is
what the protos give.

    python -m tests.nomad.generate           # rewrite monitor/adapters/nomad/protos/*_pb2*
    python -m tests.nomad.generate --check   # exit 1 naming the files that differ

protoc runs from grpcio-tools with the repository root as include path, so the generated
modules import each other as ``monitor.adapters.nomad.protos.<name>_pb2``. Messages get
``.pyi`` stubs from protoc itself (``--pyi_out``); the gRPC stubs get theirs from
mypy-protobuf's ``protoc-gen-mypy_grpc``, so mypy sees typed servicers and stubs.

The output depends on the generator versions (grpcio-tools writes its protobuf version into
each module), so those are pinned in the test dependencies; a check failing right after a
dependency update means: regenerate and commit.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "monitor" / "adapters" / "nomad" / "protos"
# Only these define services; the others would get empty *_pb2_grpc modules.
WITH_SERVICES = frozenset({"base", "device", "goplugin"})
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    """The protos, in a fixed order (protoc's output does not depend on it, but logs do)."""
    return sorted(PROTO_DIR.glob("*.proto"))


def _mypy_grpc_plugin() -> str:
    """mypy-protobuf's protoc plugin, installed next to this interpreter."""
    here = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    found = str(here) if here.exists() else shutil.which("protoc-gen-mypy_grpc")
    if found is None:
        raise SystemExit("protoc-gen-mypy_grpc not found: pip install mypy-protobuf")
    return found


def generate_into(out: Path) -> dict[str, bytes]:
    """Run protoc on every proto, writing under ``out``; return {file name: content}."""
    if importlib.util.find_spec("grpc_tools") is None:
        raise SystemExit("grpcio-tools is missing: pip install grpcio-tools")
    well_known = resources.files("grpc_tools") / "_proto"
    relative = [str(p.relative_to(REPO)) for p in proto_files()]
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={REPO}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={_mypy_grpc_plugin()}",
        f"--mypy_grpc_out={out}",
        *relative,
    ]
    # mypy-protobuf narrates each file on stderr: show that only when protoc fails.
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed ({result.returncode}):\n{result.stderr}")
    produced: dict[str, bytes] = {}
    for path in sorted((out / PROTO_DIR.relative_to(REPO)).iterdir()):
        stem = path.name.split("_pb2", 1)[0]
        if "_pb2_grpc" in path.name and stem not in WITH_SERVICES:
            continue
        produced[path.name] = path.read_bytes()
    return produced


def committed() -> dict[str, bytes]:
    """The generated files now in the tree."""
    return {
        p.name: p.read_bytes()
        for p in sorted(PROTO_DIR.iterdir())
        if p.name.endswith(GENERATED_SUFFIXES)
    }


def differences(wanted: dict[str, bytes], present: dict[str, bytes]) -> list[str]:
    """Names of files that are missing, stale or left over."""
    names = sorted(set(wanted) | set(present))
    return [n for n in names if wanted.get(n) != present.get(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only compare; exit 1 naming the differing files"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nomad-protos-") as tmp:
        wanted = generate_into(Path(tmp))
    present = committed()
    stale = differences(wanted, present)
    if args.check:
        for name in stale:
            print(f"differs from its proto: {PROTO_DIR.relative_to(REPO) / name}")
        if stale:
            print("regenerate with: python -m tests.nomad.generate", file=sys.stderr)
        return 1 if stale else 0
    for name in stale:
        target = PROTO_DIR / name
        if name in wanted:
            target.write_bytes(wanted[name])
            print(f"wrote {target.relative_to(REPO)}")
        else:
            target.unlink()
            print(f"removed {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
