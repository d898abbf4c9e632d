"""PCI vocabulary: which class codes are ours, and how vendors, types and classes are named."""

from __future__ import annotations

from collections.abc import Iterable

# PCI base classes: 0x03 display controllers, 0x12 processing accelerators.
DEFAULT_MATCH_CLASSES = ("03", "12")

VENDOR_NAMES = {0x10DE: "nvidia", 0x1002: "amd", 0x1022: "amd", 0x8086: "intel"}
TYPE_BY_BASE_CLASS = {0x03: "gpu", 0x12: "accelerator"}
NVIDIA_VENDOR_ID = 0x10DE

# The PCI base classes by name, as the PCI code and ID assignment specification lists them.
BASE_CLASS_NAMES = {
    0x00: "unclassified device",
    0x01: "mass storage controller",
    0x02: "network controller",
    0x03: "display controller",
    0x04: "multimedia controller",
    0x05: "memory controller",
    0x06: "bridge",
    0x07: "communication controller",
    0x08: "generic system peripheral",
    0x09: "input device controller",
    0x0A: "docking station",
    0x0B: "processor",
    0x0C: "serial bus controller",
    0x0D: "wireless controller",
    0x0E: "intelligent controller",
    0x0F: "satellite communications controller",
    0x10: "encryption controller",
    0x11: "signal processing controller",
    0x12: "processing accelerator",
    0x13: "non-essential instrumentation",
    0xFF: "unassigned class",
}


def class_matches(pci_class: int, match_classes: Iterable[str]) -> bool:
    """Whether a 24-bit class code starts with one of the hex prefixes (``03``, ``0302``)."""
    code = f"{pci_class:06x}"
    return any(code.startswith(prefix) for prefix in match_classes)


def vendor_name(vendor_id: int) -> str:
    return VENDOR_NAMES.get(vendor_id, f"{vendor_id:04x}")


def device_type(pci_class: int) -> str:
    return TYPE_BY_BASE_CLASS.get(pci_class >> 16, "pci")


def class_name(pci_class: int) -> str:
    return BASE_CLASS_NAMES.get(pci_class >> 16, "device of an unknown class")


def class_phrase(pci_class: int) -> str:
    """The class's name with its article, as a sentence says it: "a bridge", "an unassigned
    class" (every name starts with the sound its first letter makes)."""
    name = class_name(pci_class)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
