"""NVML's PCI bus IDs as the kernel writes addresses, by plain calls, hostile ones included
(``monitor.sources.nvml_worker.attributes``): what is no bus ID comes back as it is, to match
no GPU's address, and never raises."""

from __future__ import annotations

import pytest

from monitor.sources.nvml_worker.attributes import normalise_bus_id


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        (b"00000000:3B:00.0\x00\x00\x00", "0000:3b:00.0"),
        ("00000000:3b:00.0", "0000:3b:00.0"),
        ("0000:3B:00.0", "0000:3b:00.0"),
        (b"  00000001:5E:00.1 ", "0001:5e:00.1"),
    ],
)
def test_a_bus_id_is_the_kernel_s_address(raw: str | bytes, address: str) -> None:
    assert normalise_bus_id(raw) == address


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b":",
        b"zz:3b:00.0",
        b"\xff\xfe:3b:00.0",
        "1_0:3b:00.0",
        " +1:3b:00.0",
        "-1:3b:00.0",
        "9" * 5000 + ":3b:00.0",
        "\u0661:3b:00.0",
        "3b:00.0\x1b[31m",
    ],
    ids=lambda raw: repr(raw)[:30],
)
def test_what_is_no_bus_id_is_no_address(raw: str | bytes) -> None:
    address = normalise_bus_id(raw)
    assert isinstance(address, str) and len(address) <= len(raw) + 4  # a domain to 4 digits
    assert address not in ("0000:3b:00.0", "0001:3b:00.0", "0010:3b:00.0")
