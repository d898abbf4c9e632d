"""./install.sh, the README's one way to install the service, run into a temporary root that
looks like a base system, and the result checked by systemd's own tools with --root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "install.sh"
VENV = "opt/hotplug-monitor"
SYSTEM_PYTHON = Path("/usr/bin/python3")
# --with: each adapter's extra, and the units it runs under (Nomad starts its plugin itself).
ADAPTERS = {
    "exporter": ("hotplug-monitor-exporter.service",),
    "kubelet": ("hotplug-monitor-kubelet-plugin.service",),
    "nomad": (),
}
UNITS = ("hotplug-monitor.service", "hotplug-monitor.socket")


def tool(name: str) -> str:
    path = shutil.which(name)
    need(None if path else f"needs {name} (Debian package systemd)")
    assert path is not None
    return path


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with what units rely on from the base system (its targets, /bin/kill, /etc), and
    hotplug-monitor installed into it by install.sh."""
    need(None if SYSTEM_PYTHON.exists() else "needs /usr/bin/python3 (Debian package python3)")
    root = tmp_path_factory.mktemp("root")
    (root / "etc").mkdir()
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    shutil.copy(tool("kill"), root / "usr/bin/kill")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    result = run(INSTALL, "--root", root, "--with", ",".join(ADAPTERS))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"installed hotplug-monitor under {root}\n"
    return root


def test_the_installed_units_verify_against_the_installed_command(installed: Path) -> None:
    # verify checks, among the rest, that ExecStart's /usr/local/bin/hotplug-monitor resolves
    # within the root to an executable (the link into /opt).
    result = run(
        tool("systemd-analyze"),
        "verify",
        f"--root={installed}",
        *UNITS,
        *(unit for units in ADAPTERS.values() for unit in units),
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_the_adapters_asked_for_have_their_libraries(installed: Path) -> None:
    python = installed / VENV / "bin/python"
    adapters = ("exporter.run", "kubelet.plugin", "nomad.plugin")
    for module in (f"monitor.adapters.{adapter}" for adapter in adapters):
        found = run(python, "-c", f"import {module}")
        assert found.returncode == 0, found.stderr


def test_the_command_runs_from_the_venv_and_names_only_final_paths(installed: Path) -> None:
    link = installed / "usr/local/bin/hotplug-monitor"
    assert str(link.readlink()) == f"/{VENV}/bin/hotplug-monitor"
    script = installed / VENV / "bin/hotplug-monitor"
    assert script.read_text().splitlines()[0] == f"#!/{VENV}/bin/python3"
    staged = run("grep", "-rlI", str(installed), installed / VENV)
    assert staged.stdout == "", "files name the staging root"

    python = installed / VENV / "bin/python"
    assert python.resolve().is_relative_to("/usr"), "the service cannot see /home, /root or /tmp"
    code = "import monitor, sys; print(monitor.__file__); print(sys.prefix)"
    where = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, cwd=installed, check=True
    ).stdout.split()
    assert Path(where[0]).is_relative_to(installed / VENV)
    version = run(python, "-m", "monitor", "--version")
    assert version.stdout.startswith("hotplug-monitor ")


def test_the_group_catalog_and_docs_are_found_where_systemd_looks(installed: Path) -> None:
    sysusers = run(tool("systemd-sysusers"), f"--root={installed}")
    assert sysusers.returncode == 0, sysusers.stderr
    groups = (installed / "etc/group").read_text().splitlines()
    assert any(line.startswith("hotplug-monitor:") for line in groups), groups
    exporter = next(u for u in (installed / "etc/passwd").read_text().splitlines()
                    if u.startswith("hotplug-monitor-exporter:"))  # fmt: skip
    members = {line.split(":")[0]: line.rsplit(":", 1)[1].split(",") for line in groups}
    # the exporter reads, and may change no lease (issue 24)
    assert "hotplug-monitor-exporter" in members["hotplug-monitor-read"], (exporter, members)
    assert "hotplug-monitor-exporter" not in members["hotplug-monitor"], (exporter, members)

    journalctl = tool("journalctl")
    assert run(journalctl, f"--root={installed}", "--update-catalog").returncode == 0
    catalog = run(journalctl, f"--root={installed}", "--list-catalog").stdout
    assert "hotplug-monitor: Reservation @LEASE_ID@ granted" in catalog, catalog

    units = installed / "usr/local/lib/systemd/system"
    for unit in UNITS:
        documentation = next(
            line.removeprefix("Documentation=file:")
            for line in (units / unit).read_text().splitlines()
            if line.startswith("Documentation=")
        )
        assert (installed / documentation.lstrip("/")).read_text() == (
            ROOT / "README.md"
        ).read_text()


def test_an_interpreter_the_service_cannot_see_is_refused(tmp_path: Path) -> None:
    hidden = tmp_path / "python3"
    shutil.copy(SYSTEM_PYTHON.resolve(), hidden)
    result = run(INSTALL, "--root", tmp_path / "root", "--python", hidden)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"install.sh: error: {hidden} lives where the service cannot see it "
        "(ProtectHome=, PrivateTmp=); use --python /usr/bin/python3"
    ]
    assert not (tmp_path / "root").exists()


def test_an_unknown_adapter_ends_with_one_error_line(tmp_path: Path) -> None:
    result = run(INSTALL, "--root", tmp_path / "root", "--with", "exporter,slurm")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "install.sh: error: unknown adapter: slurm (known: exporter, kubelet, nomad)"
    ]
    assert not (tmp_path / "root").exists()


def test_an_unknown_argument_ends_with_one_error_line() -> None:
    result = run(INSTALL, "--prefix", "/usr")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "install.sh: error: unknown argument: --prefix"
    assert result.stderr.startswith("usage: ./install.sh")
