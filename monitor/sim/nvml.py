"""Scripted stand-in for libnvidia-ml.so.1, driven through files in a scenario directory.

``build_library`` compiles ``nvmlsim.c`` against NVIDIA's own ``nvml.h`` (from the
``nvidia-nvml-dev`` wheel).  A process started with ``FakeNvml.env()`` in its environment
loads it in place of the driver's NVML, so the real ``pynvml`` bindings talk to GPUs,
XID events, lost GPUs and hanging calls that a test scripts with ``FakeNvml``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import attrs

__all__ = [
    "EVENT_DOUBLE_BIT_ECC",
    "EVENT_GPU_RECOVERY_ACTION",
    "EVENT_GPU_UNAVAILABLE",
    "EVENT_MIG_CONFIG_CHANGE",
    "EVENT_XID",
    "H100_SUPPORTED_EVENTS",
    "FakeGpu",
    "FakeMig",
    "FakeNvml",
    "build_library",
    "find_nvml_include",
]

SOURCE = Path(__file__).with_name("nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"

# Event type bits, as nvml.h (NVML API 13, nvidia-nvml-dev 13.x) defines them.
EVENT_SINGLE_BIT_ECC = 0x0001  # nvmlEventTypeSingleBitEccError
EVENT_DOUBLE_BIT_ECC = 0x0002  # nvmlEventTypeDoubleBitEccError
EVENT_PSTATE = 0x0004  # nvmlEventTypePState
EVENT_XID = 0x0008  # nvmlEventTypeXidCriticalError
EVENT_MIG_CONFIG_CHANGE = 0x0100  # nvmlEventMigConfigChange
EVENT_DRAM_RETIREMENT = 0x0400  # nvmlEventTypeDramRetirementEvent
EVENT_DRAM_RETIREMENT_FAILURE = 0x0800  # nvmlEventTypeDramRetirementFailure
EVENT_NON_FATAL_POISON = 0x1000  # nvmlEventTypeNonFatalPoisonError
EVENT_FATAL_POISON = 0x2000  # nvmlEventTypeFatalPoisonError
EVENT_GPU_UNAVAILABLE = 0x4000  # nvmlEventTypeGpuUnavailableError
EVENT_GPU_RECOVERY_ACTION = 0x8000  # nvmlEventTypeGpuRecoveryAction

# What a data-centre Hopper reports: every defined type except the Kepler-only clock event,
# the laptop power-source event and the single-bit ECC storm event (0xFD0F).
H100_SUPPORTED_EVENTS = (
    EVENT_SINGLE_BIT_ECC
    | EVENT_DOUBLE_BIT_ECC
    | EVENT_PSTATE
    | EVENT_XID
    | EVENT_MIG_CONFIG_CHANGE
    | EVENT_DRAM_RETIREMENT
    | EVENT_DRAM_RETIREMENT_FAILURE
    | EVENT_NON_FATAL_POISON
    | EVENT_FATAL_POISON
    | EVENT_GPU_UNAVAILABLE
    | EVENT_GPU_RECOVERY_ACTION
)


@attrs.frozen
class FakeGpu:
    """One scripted GPU; the defaults describe an H100 SXM 80 GB."""

    bus_id: str
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_mib: int = 81559
    bar1_mib: int = 131072
    power_limit_mw: int = 700000
    max_sm_clock_mhz: int = 1980
    max_mem_clock_mhz: int = 2619
    pcie_max_gen: int = 5
    pcie_max_width: int = 16
    cc_major: int = 9
    cc_minor: int = 0
    persistence: int = 1
    display_mode: int = 0
    mig_mode: int = 0
    minor: int = 0
    lost: bool = False
    register_error: int = 0
    supported_events: int = H100_SUPPORTED_EVENTS
    recovery_action: int = 0
    pci_device_id: int = 0x233010DE
    pci_subsystem_id: int = 0x16C110DE
    # What the telemetry calls answer (the stats method); defaults are an idle GPU.
    util_gpu: int = 0  # %
    util_memory: int = 0
    util_encoder: int = 0
    util_decoder: int = 0
    memory_used_mib: int = 0
    bar1_used_mib: int = 0
    temperature_c: int = 30
    temperature_slowdown_c: int = 87
    power_mw: int = 70000
    energy_mj: int = 0
    sm_clock_mhz: int = 345
    mem_clock_mhz: int = 2619
    pcie_tx_kbps: int = 0
    pcie_rx_kbps: int = 0
    ecc_volatile_corrected: int = 0
    ecc_volatile_uncorrected: int = 0
    ecc_aggregate_corrected: int = 0
    ecc_aggregate_uncorrected: int = 0
    ecc_l1: int = 0  # uncorrected, volatile, by location
    ecc_l2: int = 0
    ecc_dram: int = 0
    retired_sbe: int = 0  # pages
    retired_dbe: int = 0
    retired_pending: int = 0
    remapped_correctable: int = 0  # rows
    remapped_uncorrectable: int = 0
    remapped_pending: int = 0
    remapped_failed: int = 0
    throttle_reasons: int = 0x1  # NVML's clock event reason bits (gpu idle)
    pcie_replays: int = 0  # nvmlDeviceGetPcieReplayCounter
    nvlink_links: int = 0  # links 0..n-1 exist (an H100 SXM has 18); 0: no NVLink
    nvlink_down: int = 0  # bit k: link k is inactive
    unsupported: tuple[str, ...] = ()  # NVML functions that answer NOT_SUPPORTED for this GPU
    max_mig: int = 7  # nvmlDeviceGetMaxMigDeviceCount

    def line(self) -> str:
        """Render this GPU as one line of the ``gpus`` file the C side parses."""
        fields: list[str] = []
        for field in attrs.fields(FakeGpu):
            value = getattr(self, field.name)
            if field.name in (
                "supported_events",
                "pci_device_id",
                "pci_subsystem_id",
                "throttle_reasons",
                "nvlink_down",
            ):
                text = f"{value:x}"
            elif field.name == "unsupported":
                text = ",".join(value)
            elif isinstance(value, bool):
                text = str(int(value))
            else:
                text = str(value)
            if any(c in text for c in "\t\n"):
                raise ValueError(f"{field.name} must not contain tabs or newlines: {text!r}")
            fields.append(f"{field.name}={text}")
        return "\t".join(fields)


@attrs.frozen
class FakeMig:
    """One MIG device of a GPU in MIG mode: its index among the GPU's MIG devices (0..6), its
    UUID, GPU and compute instance IDs, slices and memory, as nvmlDeviceGetAttributes gives
    them. ``monitor.sim.mig`` has an H100's profiles ready made."""

    index: int
    uuid: str
    gi: int
    ci: int
    gpu_slices: int
    compute_slices: int
    memory_mib: int

    def line(self, bus_id: str) -> str:
        fields = {"bus_id": bus_id, **attrs.asdict(self)}
        text = "\t".join(f"{k}={v}" for k, v in fields.items())
        if "\n" in text or text.count("\t") != len(fields) - 1:
            raise ValueError(f"MIG device fields must not contain tabs or newlines: {text!r}")
        return text


def find_nvml_include() -> Path:
    """Directory holding ``nvml.h`` from the installed ``nvidia-nvml-dev`` wheel.

    The wheel's layout changes with CUDA major versions (``nvidia/cu13/include`` today,
    ``nvidia/nvml/include`` before), so look the header up from the wheel's file list,
    then fall back to scanning the ``nvidia`` namespace package.
    """
    try:
        dist = importlib.metadata.distribution("nvidia-nvml-dev")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name == "nvml.h":
                return Path(str(dist.locate_file(file))).parent
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for header in sorted(Path(root).glob("*/include/nvml.h")):
            return header.parent
    raise FileNotFoundError("nvml.h not found: pip install nvidia-nvml-dev")


def build_library(build_dir: Path) -> Path:
    """Compile the stand-in into ``build_dir/libnvidia-ml.so.1``; return ``build_dir``.

    Skips the build when the library is newer than the source.  Compiles to a unique
    temporary name and renames it into place, so concurrent callers (xdist workers,
    parallel sessions) never load a half-written library.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    target = build_dir / LIBRARY_NAME
    if target.exists() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return build_dir
    fd, tmp_name = tempfile.mkstemp(prefix=f".{LIBRARY_NAME}.", suffix=".tmp", dir=build_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        subprocess.run(
            [
                "gcc",
                "-shared",
                "-fPIC",
                "-O2",
                "-Wall",
                "-Werror",
                "-pthread",
                f"-I{find_nvml_include()}",
                "-o",
                str(tmp),
                str(SOURCE),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return build_dir


def _write_atomic(path: Path, text: str) -> None:
    """Replace a control file in one step, so the C side sees the old or the new contents."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as tmp:
            tmp.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _append_line(path: Path, line: str) -> None:
    """Append one whole line with a single O_APPEND write, so a polling reader never
    sees a torn line from us."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path}")
    finally:
        os.close(fd)


class FakeNvml:
    """A scenario directory that the stand-in library reads on every NVML call (which GPUs
    there are, at the first nvmlInit only)."""

    def __init__(
        self,
        directory: Path,
        lib_dir: Path,
        gpus: Iterable[FakeGpu],
        *,
        record_calls: bool = False,
    ) -> None:
        """Create the scenario with these GPUs; ``record_calls`` starts the call log."""
        self.directory = directory
        self.lib_dir = lib_dir
        directory.mkdir(parents=True, exist_ok=True)
        self.set_gpus(gpus)
        self._mig: dict[str, tuple[FakeMig, ...]] = {}
        (directory / "events").touch()
        if record_calls:
            (directory / "calls").touch()

    def env(self) -> dict[str, str]:
        """Environment entries that make a new process load the stand-in."""
        existing = os.environ.get("LD_LIBRARY_PATH", "")
        path = f"{self.lib_dir}:{existing}" if existing else str(self.lib_dir)
        return {"LD_LIBRARY_PATH": path, "FAKE_NVML_DIR": str(self.directory)}

    def set_gpus(self, gpus: Iterable[FakeGpu]) -> None:
        """Replace the GPU list (order = NVML index). Running processes pick up the attributes
        of the GPUs they enumerated; a GPU new to the list (or back in it) they see only after a
        fresh init, every nvmlInit shut down first, as with the driver's library."""
        text = "".join(gpu.line() + "\n" for gpu in gpus)
        _write_atomic(self.directory / "gpus", text)

    def set_mig(self, bus_id: str, devices: Iterable[FakeMig], *, announce: bool = True) -> None:
        """Replace the MIG devices of the GPU at ``bus_id`` (its ``mig_mode`` says whether NVML
        shows them), then, with ``announce``, deliver the MIG config change event as the driver
        does after a repartition. Running processes see the new layout at their next call."""
        self._mig[bus_id] = tuple(devices)
        text = "".join(
            device.line(bus) + "\n" for bus, devices in self._mig.items() for device in devices
        )
        _write_atomic(self.directory / "mig", text)
        if announce:
            self.event(bus_id, EVENT_MIG_CONFIG_CHANGE)

    def set_driver_version(self, version: str) -> None:
        """Change what nvmlSystemGetDriverVersion returns, e.g. to simulate an upgrade."""
        _write_atomic(self.directory / "driver_version", version + "\n")

    def event(
        self,
        bus_id: str,
        event_type: int,
        data: int = 0,
        gpu_instance: int | None = None,
        compute_instance: int | None = None,
    ) -> None:
        """Deliver one event of ``event_type`` for the GPU at ``bus_id`` to registered sets;
        the instance IDs (None: 0xFFFFFFFF, none) are the event data's."""
        line = f"{bus_id}\t{event_type:x}\t{data}"
        if gpu_instance is not None or compute_instance is not None:
            none = 0xFFFFFFFF
            gi = none if gpu_instance is None else gpu_instance
            ci = none if compute_instance is None else compute_instance
            line += f"\t{gi}\t{ci}"
        _append_line(self.directory / "events", line)

    def xid(
        self,
        bus_id: str,
        xid: int,
        gpu_instance: int | None = None,
        compute_instance: int | None = None,
    ) -> None:
        """Deliver an Xid critical error event carrying XID number ``xid`` (attributed to a
        GPU and compute instance, where given)."""
        self.event(bus_id, EVENT_XID, xid, gpu_instance, compute_instance)

    def hang(self, function: str, bus_id: str | None = None) -> None:
        """Make calls of ``function`` (for ``bus_id`` only, if given) block until unhang()."""
        _write_atomic(self.directory / "hang", function + (f"\t{bus_id}" if bus_id else "") + "\n")

    def unhang(self) -> None:
        """Release every call blocked by hang()."""
        (self.directory / "hang").unlink(missing_ok=True)

    def fail_init(self, code: int) -> None:
        """Make nvmlInit* return ``code`` (0 clears it)."""
        path = self.directory / "init_error"
        if code:
            _write_atomic(path, f"{code}\n")
        else:
            path.unlink(missing_ok=True)

    def crash(self, function: str, bus_id: str | None = None) -> None:
        """Make calls of ``function`` abort() the calling process."""
        _write_atomic(self.directory / "crash", function + (f"\t{bus_id}" if bus_id else "") + "\n")

    def uncrash(self) -> None:
        """Let calls named by crash() run again."""
        (self.directory / "crash").unlink(missing_ok=True)

    def calls(self) -> list[str]:
        """NVML functions called so far, in order (needs ``record_calls=True``)."""
        path = self.directory / "calls"
        if not path.exists():
            raise RuntimeError("call recording is off: pass record_calls=True")
        return path.read_text().splitlines()
