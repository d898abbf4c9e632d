"""Model names from udev's hardware database, the same one udevd uses for ID_MODEL_FROM_DATABASE.

With the kernel's raw events there is no udevd to add those names, so we ask the database through
libudev ourselves. Missing database or library: names fall back to the numeric IDs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import threading

_BRACKETED = re.compile(r"\[([^\[\]]+)\]\s*$")


class _Hwdb:
    def __init__(self) -> None:
        name = ctypes.util.find_library("udev") or "libudev.so.1"
        lib = ctypes.CDLL(name)
        lib.udev_new.restype = ctypes.c_void_p
        lib.udev_hwdb_new.restype = ctypes.c_void_p
        lib.udev_hwdb_new.argtypes = [ctypes.c_void_p]
        lib.udev_hwdb_get_properties_list_entry.restype = ctypes.c_void_p
        lib.udev_hwdb_get_properties_list_entry.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        for fn in ("udev_list_entry_get_name", "udev_list_entry_get_value"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.udev_list_entry_get_next.restype = ctypes.c_void_p
        lib.udev_list_entry_get_next.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._lock = threading.Lock()  # libudev objects are not thread-safe
        self._hwdb = lib.udev_hwdb_new(lib.udev_new())
        if not self._hwdb:
            raise OSError("udev hardware database is not available")

    def properties(self, modalias: str) -> dict[str, str]:
        lib = self._lib
        found = {}
        with self._lock:
            entry = lib.udev_hwdb_get_properties_list_entry(self._hwdb, modalias.encode(), 0)
            while entry:
                key = lib.udev_list_entry_get_name(entry)
                value = lib.udev_list_entry_get_value(entry)
                found[key.decode(errors="replace")] = value.decode(errors="replace")
                entry = lib.udev_list_entry_get_next(entry)
        return found


@functools.cache
def _database() -> _Hwdb | None:
    try:
        return _Hwdb()
    except OSError:
        return None


@functools.cache
def pci_model_name(vendor_id: int, device_id: int) -> str | None:
    """The marketing name of a PCI device ("H100 SXM5 80GB"), or None if the database lacks it.

    The database writes most names as "codename [marketing name]"; the bracketed part is what
    operators know the device by and what stays the same across codenames.
    """
    database = _database()
    if database is None:
        return None
    model = database.properties(f"pci:v{vendor_id:08X}d{device_id:08X}").get(
        "ID_MODEL_FROM_DATABASE"
    )
    if not model:
        return None
    bracketed = _BRACKETED.search(model)
    return bracketed.group(1).strip() if bracketed else model.strip()
