"""The whole-run check that the suite leaves the host's own daemon alone (tests/hermetic.py)."""

from __future__ import annotations

import os
from pathlib import Path

from monitor.daemon.config import default_cdi_dir, default_state_dir
from monitor.wire.paths import SYSTEM_SOCKET
from tests.hermetic import HOST_PATHS, host_fingerprint


def test_the_check_covers_every_path_the_host_daemon_keeps() -> None:
    cdi = default_cdi_dir()
    assert cdi is not None  # the suite runs as root
    for path in (default_state_dir(), SYSTEM_SOCKET.parent, cdi / "hotplug-monitor.json"):
        assert path in HOST_PATHS
    assert Path("/run/cdi/hotplug-monitor.json") in HOST_PATHS


def test_any_change_below_a_path_changes_its_fingerprint(tmp_path: Path) -> None:
    state, spec = tmp_path / "state", tmp_path / "cdi" / "hotplug-monitor.json"
    paths = (state, spec)
    absent = host_fingerprint(paths)
    assert absent == {str(state): None, str(spec): None}
    state.mkdir()
    lease_file = state / "leases.json"
    lease_file.write_text('{"leases": []}')
    kept = host_fingerprint(paths)
    assert kept != absent and kept == host_fingerprint(paths)
    # the same size and times, other contents: only the hash tells
    st = lease_file.stat()
    lease_file.write_text('{"leases": {}}')
    os.utime(lease_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert host_fingerprint(paths) != kept
    lease_file.write_text('{"leases": []}')
    os.utime(lease_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(state, ns=(state.stat().st_atime_ns, kept[str(state)][2]))
    assert host_fingerprint(paths) == kept
    spec.parent.mkdir()
    spec.write_text("{}")
    assert host_fingerprint(paths)[str(spec)] is not None
    (state / "leases.journal").write_text("")
    assert str(state / "leases.journal") in host_fingerprint(paths)
