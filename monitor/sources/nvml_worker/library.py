"""What the worker's modules share of pynvml: its errors, its strings, its sizes."""

from __future__ import annotations

import pynvml

GPU_IS_LOST: int = pynvml.NVML_ERROR_GPU_IS_LOST
TIMEOUT: int = pynvml.NVML_ERROR_TIMEOUT
FUNCTION_NOT_FOUND: int = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
NOT_FOUND: int = pynvml.NVML_ERROR_NOT_FOUND
MIB = 1 << 20


def error_code(exc: BaseException) -> int | None:
    """NVML's return code behind ``exc``, if it is an NVML error."""
    code = getattr(exc, "value", None) if isinstance(exc, pynvml.NVMLError) else None
    return code if isinstance(code, int) else None


def is_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the GPU fell off the bus."""
    return error_code(exc) == GPU_IS_LOST


def text(value: str | bytes) -> str:
    """A string NVML returned, as text (older bindings return bytes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
