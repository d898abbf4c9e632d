"""Generate the Python code for the kubelet plugin's protos, or check that the committed code is
what the protos give (as ``tests.nomad.generate`` does for Nomad's).

    python -m tests.host.kubelet.generate           # rewrite monitor/adapters/kubelet/protos/*_pb2*
    python -m tests.host.kubelet.generate --check   # exit 1 naming the files that differ

protoc from grpcio-tools, repository root as include path (the modules import each other as
``monitor.adapters.kubelet.protos.<name>_pb2``); ``.pyi`` stubs from protoc and, for the gRPC
modules, from mypy-protobuf. Both are pinned in the test extra: their versions are written into
what they generate.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from tests.nomad.generate import GENERATED_SUFFIXES, _mypy_grpc_plugin, differences

REPO = Path(__file__).resolve().parents[3]
PROTO_DIR = REPO / "monitor" / "adapters" / "kubelet" / "protos"


def generate_into(out: Path) -> dict[str, bytes]:
    if importlib.util.find_spec("grpc_tools") is None:
        raise SystemExit("grpcio-tools is missing: pip install grpcio-tools")
    well_known = resources.files("grpc_tools") / "_proto"
    protos = [str(p.relative_to(REPO)) for p in sorted(PROTO_DIR.glob("*.proto"))]
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
        *protos,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed ({result.returncode}):\n{result.stderr}")
    return {p.name: p.read_bytes() for p in sorted((out / PROTO_DIR.relative_to(REPO)).iterdir())}


def committed() -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(PROTO_DIR.iterdir())
        if p.name.endswith(GENERATED_SUFFIXES)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kubelet-protos-") as tmp:
        wanted = generate_into(Path(tmp))
    stale = differences(wanted, committed())
    if args.check:
        for name in stale:
            print(f"differs from its proto: {PROTO_DIR.relative_to(REPO) / name}")
        if stale:
            print("regenerate with: python -m tests.host.kubelet.generate", file=sys.stderr)
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
