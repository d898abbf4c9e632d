"""./install.sh, the README's one way to install the service, run into a temporary root that
looks like a base system, and the result checked by systemd's own tools with --root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from monitor.cli.parser import build_parser
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


def base_system(root: Path) -> Path:
    """What units rely on from the base system: its targets, /bin/kill, /etc."""
    (root / "etc").mkdir()
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    shutil.copy(tool("kill"), root / "usr/bin/kill")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    return root


def tree(root: Path) -> set[Path]:
    """Every path under root but directories (links included, not followed)."""
    return {p.relative_to(root) for p in root.rglob("*") if p.is_symlink() or not p.is_dir()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_system(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def installed(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root like the base system, with hotplug-monitor installed into it by install.sh."""
    need(None if SYSTEM_PYTHON.exists() else "needs /usr/bin/python3 (Debian package python3)")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(base, root, symlinks=True, dirs_exist_ok=True)
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
    doc = installed / "usr/local/share/doc/hotplug-monitor"
    for page in ROOT.glob("docs/*.md"):  # the README's links resolve where it is installed
        assert (doc / "docs" / page.name).read_text() == page.read_text()


def test_the_man_page_is_installed_and_renders_without_warnings(installed: Path) -> None:
    page = installed / "usr/local/share/man/man8/hotplug-monitor.8"
    assert page.stat().st_mode & 0o777 == 0o644
    need(None if shutil.which("man") else "needs man (Debian package man-db)")
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MANWIDTH": "80"}
    shown = subprocess.run(
        ["man", "--warnings", "-l", str(page)], capture_output=True, text=True, env=env, timeout=60
    )
    assert (shown.returncode, shown.stderr) == (0, "")
    _, commands = build_parser()
    for name in ("NAME", "SYNOPSIS", "COMMANDS", "EXIT STATUS", "FILES", "SEE ALSO", *commands):
        assert f"\n   {name}\n" in shown.stdout or f"\n{name}\n" in shown.stdout, name


def test_uninstall_removes_everything_install_put_there(base: Path, installed: Path) -> None:
    # a copy, so the other tests keep theirs; install.sh added what the base system lacks (the
    # other tests' systemd-sysusers and journalctl --root wrote etc/ and var/, as the system's
    # own tools do: the groups and the catalog's database are left, as install.sh --help says)
    added = {p for p in tree(installed) - tree(base) if p.parts[0] not in ("etc", "var")}
    assert {Path("usr/local/share/man/man8/hotplug-monitor.8"),
            Path("usr/local/lib/systemd/system/hotplug-monitor-exporter.service"),
            Path("usr/local/lib/sysusers.d/hotplug-monitor-exporter.conf")} <= added  # fmt: skip
    copy = shutil.copytree(installed, installed.parent / "uninstalled", symlinks=True)
    result = run(INSTALL, "--uninstall", "--root", copy)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"removed hotplug-monitor from under {copy}\n"
    assert tree(copy) & added == set()


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
