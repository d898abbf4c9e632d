"""Which devices NVML reads, by plain calls: the worker's targets and their resets
(``monitor.core.rules.nvidia``)."""

from __future__ import annotations

from monitor.core.rules.nvidia import nvml_resets

A, B = "0000:3b:00.0", "0000:5e:00.0"


def test_the_first_targets_reset_no_gpu() -> None:
    assert nvml_resets(None, {A: 1, B: 0}) == []
    assert nvml_resets({}, {A: 1}) == []


def test_a_gpu_whose_recoveries_changed_is_reset() -> None:
    assert nvml_resets({A: 0, B: 0}, {A: 1, B: 0}) == [A]
    assert nvml_resets({A: 2, B: 0}, {A: 3, B: 1}) == [A, B]  # sorted


def test_a_gpu_new_to_the_worker_or_gone_from_it_is_not_reset() -> None:
    assert nvml_resets({A: 0}, {A: 0, B: 4}) == []  # B is watched afresh anyway
    assert nvml_resets({A: 0, B: 1}, {A: 0}) == []
    assert nvml_resets({A: 0}, {}) == []
