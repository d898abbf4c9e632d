"""Ready-made MIG layouts for the stand-in NVML, and the driver's mig-minors file for tests.

An H100 80GB's GPU instance profiles with the memory ``nvidia-smi mig -lgip`` lists for them
(9.75, 19.62, 39.50 and 79.25 GiB); ``h100_mig`` makes one MIG device of a profile, and
``example_layout`` the layout the tests (and the adapters' tests) start from: two 1g.10gb and
one 3g.40gb instance. ``mig_minors_text`` writes a ``mig-minors`` file as the driver numbers
it: per GPU, 15 GPU instances of 8 compute instances each, after ``config`` and ``monitor``.

A host test starts a daemon with a simulated H100 in MIG mode like this (``tests/host/
test_mig.py`` does)::

    sim.add("nvidia-h100", ADDRESS, 0)
    nvml = mig_h100_nvml(tmp_path, nvml_lib, ADDRESS)   # FakeNvml, MIG mode on, example layout
    minors = write_mig_minors(tmp_path / "mig-minors")
    daemon = start_daemon("--udev-source", "udev", "--mig-minors", str(minors),
                          env={**sim.daemon_env(), **nvml.env()}, nvml=True)
"""

from __future__ import annotations

from pathlib import Path

from monitor.sim.nvml import FakeGpu, FakeMig, FakeNvml

# profile -> (GPU slices, memory MiB) of an H100 80GB HBM3
H100_PROFILES: dict[str, tuple[int, int]] = {
    "1g.10gb": (1, 9984),
    "1g.20gb": (1, 20096),
    "2g.20gb": (2, 20096),
    "3g.40gb": (3, 40448),
    "4g.40gb": (4, 40448),
    "7g.80gb": (7, 81152),
}
EXAMPLE_UUIDS = (
    "MIG-11111111-1111-4111-8111-111111111111",
    "MIG-22222222-2222-4222-8222-222222222222",
    "MIG-33333333-3333-4333-8333-333333333333",
)
EXAMPLE_GPU_UUID = "GPU-0a0a0a0a-1111-2222-3333-444444444444"
GPU_INSTANCES = 15  # per GPU, as the driver's mig-minors file numbers them
COMPUTE_INSTANCES = 8  # per GPU instance


def h100_mig(
    profile: str, index: int, gi: int, uuid: str, ci: int = 0, compute_slices: int | None = None
) -> FakeMig:
    """MIG device ``index`` of an H100: GPU instance ``gi`` of ``profile`` (``1g.10gb``, ...),
    compute instance ``ci`` of ``compute_slices`` (default: all of the GPU instance's)."""
    slices, memory = H100_PROFILES[profile]
    compute = slices if compute_slices is None else compute_slices
    return FakeMig(index, uuid, gi, ci, slices, compute, memory)


def example_layout() -> list[FakeMig]:
    """Two 1g.10gb instances (GPU instances 9 and 10) and one 3g.40gb (GPU instance 2), with
    the GPU instance IDs an H100 gives them, and their full compute instance (0)."""
    one, two, three = EXAMPLE_UUIDS
    return [
        h100_mig("3g.40gb", 0, 2, three),
        h100_mig("1g.10gb", 1, 9, one),
        h100_mig("1g.10gb", 2, 10, two),
    ]


def mig_h100_nvml(
    tmp_path: Path,
    lib_dir: Path,
    address: str,
    *,
    uuid: str = EXAMPLE_GPU_UUID,
    minor: int = 0,
    layout: list[FakeMig] | None = None,
) -> FakeNvml:
    """A scenario (in ``tmp_path / "nvml"``) with one H100 at ``address`` in MIG mode, with
    ``layout`` (default ``example_layout()``) as its MIG devices."""
    gpu = FakeGpu(bus_id=address, uuid=uuid, minor=minor, mig_mode=1)
    nvml = FakeNvml(tmp_path / "nvml", lib_dir, [gpu])
    nvml.set_mig(address, example_layout() if layout is None else layout, announce=False)
    return nvml


def gi_access_minor(gpu_minor: int, gi: int) -> int:
    """The capability minor the driver gives ``gpu<minor>/gi<gi>/access``."""
    return 3 + gpu_minor * GPU_INSTANCES * (COMPUTE_INSTANCES + 1) + gi * (COMPUTE_INSTANCES + 1)


def ci_access_minor(gpu_minor: int, gi: int, ci: int) -> int:
    """The capability minor of ``gpu<minor>/gi<gi>/ci<ci>/access``."""
    return gi_access_minor(gpu_minor, gi) + 1 + ci


def mig_minors_text(gpus: int = 8) -> str:
    """A mig-minors file as the driver writes it, for ``gpus`` GPUs."""
    lines = ["config 1", "monitor 2"]
    for g in range(gpus):
        for gi in range(GPU_INSTANCES):
            lines.append(f"gpu{g}/gi{gi}/access {gi_access_minor(g, gi)}")
            lines.extend(
                f"gpu{g}/gi{gi}/ci{ci}/access {ci_access_minor(g, gi, ci)}"
                for ci in range(COMPUTE_INSTANCES)
            )
    return "\n".join(lines) + "\n"


def write_mig_minors(path: Path, gpus: int = 8) -> Path:
    path.write_text(mig_minors_text(gpus))
    return path
