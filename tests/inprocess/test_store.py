"""The lease snapshot and journal on real files: a crash at any moment loses no answered change,
a torn last record is dropped, and damage anywhere else is that record or lease set aside, never
trusted, while every other is kept; what the store writes it reads back."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from unittest import mock

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor.core.leases import Holder, Lease
from monitor.outputs import records, store
from monitor.outputs.store import LeaseStore, StoreError

DEVICES = [f"0000:0{i}:00.0" for i in range(1, 5)]


def lease(lease_id: str, *devices: str) -> Lease:
    return Lease(
        id=lease_id,
        devices=dict.fromkeys(devices, "10de/gpu/NVIDIA H100 80GB HBM3"),
        uid=1000,
        gid=1000,
        pid=4242,
        created=1.0,
    )


def no_legacy(pid: int, started: float) -> None:
    return None


Leases = frozenset[str]


def each(leases: Iterable[Lease]) -> Leases:
    """Leases as comparable values (a lease holds a mapping: it has no hash)."""
    return frozenset(json.dumps(lease.to_json(), sort_keys=True) for lease in leases)


def read_back(state_dir: Path) -> Leases:
    """What a daemon starting now would restore."""
    return each(LeaseStore(state_dir).load(no_legacy))


def started(state_dir: Path) -> LeaseStore:
    """A store as the daemon has it once started: loaded, then compacted."""
    kept = LeaseStore(state_dir)
    kept.compact(kept.load(no_legacy))
    return kept


@contextlib.contextmanager
def alarms() -> Iterator[list[str]]:
    """The critical lines the store logs meanwhile."""
    raised: list[str] = []
    handler = logging.Handler(logging.CRITICAL)
    handler.emit = lambda record: raised.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(store.__name__)
    logger.addHandler(handler)
    try:
        yield raised
    finally:
        logger.removeHandler(handler)


class Crash(Exception):
    """The process died here."""


@st.composite
def histories(draw: st.DrawFn) -> list[list[Lease]]:
    """Each step: which devices are held, each by its own lease, kept across steps while held."""
    steps = []
    current: dict[str, Lease] = {}
    for step in range(draw(st.integers(1, 12))):
        held = draw(st.sets(st.sampled_from(DEVICES)))
        current = {d: current.get(d) or lease(f"L{step}-{d[5:7]}", d) for d in held}
        steps.append(list(current.values()))
    return steps


@given(
    history=histories(),
    crash_at=st.integers(0, 11),
    how=st.sampled_from(["torn", "after the write", "compacting"]),
    cut=st.floats(0, 1, exclude_max=True),
    compact_at=st.sampled_from([200, 1 << 20]),
)
def test_a_crash_at_any_moment_loses_no_answered_change(
    tmp_path_factory: pytest.TempPathFactory,
    history: list[list[Lease]],
    crash_at: int,
    how: str,
    cut: float,
    compact_at: int,
) -> None:
    state_dir = tmp_path_factory.mktemp("state")
    answered: Leases = frozenset()
    crashed: Leases | None = None  # what the change that crashed was to be
    kept = started(state_dir)
    real_pwrite = os.pwrite

    def torn_pwrite(fd: int, data: bytes, offset: int) -> int:
        real_pwrite(fd, data[: int(len(data) * cut)], offset)
        raise Crash

    def crash(*_: object) -> None:
        raise Crash

    faults: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "torn": lambda: mock.patch.object(os, "pwrite", torn_pwrite),
        "after the write": lambda: mock.patch.object(os, "fdatasync", crash),
        "compacting": lambda: mock.patch.object(records.RecordFile, "reset", crash),
    }
    with mock.patch.object(store, "COMPACT_AT", compact_at):
        for step, leases in enumerate(history):
            if step == crash_at:
                # Compaction comes when the journal is long; here, at this step.
                write = kept.compact if how == "compacting" else kept.save
                try:
                    with faults[how]():
                        write(leases)
                except Crash:
                    crashed = each(leases)
                    break
            else:
                kept.save(leases)
            answered = each(leases)
        with alarms() as raised:
            restored = read_back(state_dir)
    assert raised == [], "a crash was taken for damage"
    if crashed is None:
        assert restored == answered
    elif how == "torn":
        assert restored == answered  # an unfinished record is never read back
    elif how == "after the write":
        assert restored in (answered, crashed)  # written, never answered: either is right
    else:  # the snapshot was renamed into place: that is the change's commit
        assert restored in (answered, crashed)


def test_a_torn_last_record_is_dropped_with_a_warning_and_appends_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept = started(tmp_path)
    first = [lease("a", DEVICES[0])]
    kept.save(first)
    with (tmp_path / "leases.journal").open("ab") as handle:
        handle.write(records.encode(b'{"seq": 2, "put": [], "end": ["a"]}')[:-7])
    with caplog.at_level(logging.WARNING):
        again = LeaseStore(tmp_path)
        assert each(again.load(no_legacy)) == each(first)
    assert "dropped a torn last record" in caplog.text
    second = [*first, lease("b", DEVICES[1])]
    again.save(second)  # written over the torn bytes
    assert read_back(tmp_path) == each(second)


def journal_lines(state_dir: Path) -> list[bytes]:
    return (state_dir / "leases.journal").read_bytes().splitlines(keepends=True)


@pytest.fixture
def three_records(tmp_path: Path) -> Iterator[Path]:
    """Records that put a, then b, then c (ending nothing)."""
    kept = started(tmp_path)
    kept.save([lease("a", DEVICES[0])])
    kept.save([lease("a", DEVICES[0]), lease("b", DEVICES[1])])
    kept.save([lease("a", DEVICES[0]), lease("b", DEVICES[1]), lease("c", DEVICES[2])])
    assert len(journal_lines(tmp_path)) == 3
    yield tmp_path


A_AND_C = each([lease("a", DEVICES[0]), lease("c", DEVICES[2])])  # the second record lost


def test_damage_before_the_end_loses_that_record_alone_and_sets_it_aside(
    three_records: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = journal_lines(three_records)
    damaged = lines[1].replace(b'"b"', b'"x"')  # same length, wrong checksum
    (three_records / "leases.journal").write_bytes(lines[0] + damaged + lines[2])
    with caplog.at_level(logging.CRITICAL):
        assert read_back(three_records) == A_AND_C
    assert "fails its checksum" in caplog.text
    (aside,) = three_records.glob("leases.journal.corrupt-*")
    assert aside.read_bytes() == damaged  # kept for a person to look at
    assert journal_lines(three_records) == [lines[0], damaged, lines[2]]  # read, not rewritten


@pytest.mark.parametrize(
    ("record", "complaint"),
    [
        (
            {
                "seq": 2,
                "put": [{"reservation_id": "x", "devices": {"../../etc": "a/b/c"}}],
                "end": [],
            },
            "not a PCI address",
        ),
        ({"seq": 2, "put": [], "end": [7]}, "reservation IDs"),
        ({"seq": 5, "put": [], "end": ["a"]}, "number 5 where 2 was due"),
        ([], "not a JSON object"),
        ({"seq": 2, "put": [], "end": [], "at": float("nan")}, "NaN is not a JSON value"),
    ],
)
def test_a_record_with_a_sound_checksum_that_lies_is_not_trusted(
    three_records: Path, caplog: pytest.LogCaptureFixture, record: object, complaint: str
) -> None:
    lines = journal_lines(three_records)
    lie = records.encode(json.dumps(record).encode())
    (three_records / "leases.journal").write_bytes(lines[0] + lie + lines[2])
    with caplog.at_level(logging.CRITICAL):
        assert read_back(three_records) == A_AND_C
    assert complaint in caplog.text, caplog.text
    (aside,) = three_records.glob("leases.journal.corrupt-*")
    assert aside.read_bytes() == lie


def test_a_lease_that_is_not_valid_is_left_out_alone_from_snapshot_and_record(
    three_records: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept = LeaseStore(three_records)
    kept.compact([lease("a", DEVICES[0]), lease("b", DEVICES[1])])
    snapshot = json.loads((three_records / "leases.json").read_text())
    snapshot["leases"][0]["devices"] = {DEVICES[0]: "nvidia/gpu/\x1b[2J"}
    (three_records / "leases.json").write_text(json.dumps(snapshot))
    bad_put = {"seq": snapshot["seq"] + 1, "put": [{"reservation_id": "y"}], "end": []}
    good_put = {"seq": snapshot["seq"] + 2, "put": [lease("c", DEVICES[2]).to_json()], "end": []}
    journal = b"".join(records.encode(json.dumps(r).encode()) for r in (bad_put, good_put))
    (three_records / "leases.journal").write_bytes(journal)
    with caplog.at_level(logging.CRITICAL):
        assert read_back(three_records) == each([lease("b", DEVICES[1]), lease("c", DEVICES[2])])
    assert "lease a: '" in caplog.text and "is not a vendor/type/name" in caplog.text
    assert "lease y: devices is not a map" in caplog.text
    assert len(list(three_records.glob("leases.json.corrupt-*"))) == 1


@pytest.mark.parametrize("write", ["save", "compact"])
def test_the_writer_refuses_a_lease_its_reader_would_not_take_back(
    tmp_path: Path, write: str
) -> None:
    kept = started(tmp_path)
    good = lease("a", DEVICES[0])
    kept.save([good])
    unreadable = attrs.evolve(lease("b", DEVICES[1]), devices={DEVICES[1]: "nvidia/gpu/\a"})
    with pytest.raises(StoreError, match="would not read back"):
        getattr(kept, write)([good, unreadable])
    assert read_back(tmp_path) == each([good])
    kept.save([good, lease("c", DEVICES[2])])  # the store goes on
    assert read_back(tmp_path) == each([good, lease("c", DEVICES[2])])


def test_a_journal_that_is_a_symlink_is_set_aside_and_the_snapshot_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept = started(tmp_path)
    kept.compact([lease("a", DEVICES[0])])
    (tmp_path / "leases.journal").unlink()
    (tmp_path / "leases.journal").symlink_to("/etc/hostname")
    with caplog.at_level(logging.CRITICAL):
        assert read_back(tmp_path) == each([lease("a", DEVICES[0])])
    assert "is a symbolic link" in caplog.text
    assert Path("/etc/hostname").read_text()  # followed by nothing, written by nothing


def test_a_change_the_disk_refuses_is_not_on_disk_and_the_next_one_is(tmp_path: Path) -> None:
    kept = started(tmp_path)
    first = [lease("a", DEVICES[0])]
    kept.save(first)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with mock.patch.object(os, "fdatasync", failing), pytest.raises(StoreError) as refused:
        kept.save([*first, lease("b", DEVICES[1])])
    assert "Input/output error" in str(refused.value)
    assert read_back(tmp_path) == each(first)  # written, then cut off again
    third = [*first, lease("c", DEVICES[2])]
    kept.save(third)
    assert read_back(tmp_path) == each(third)


def test_a_version_2_file_is_read_and_written_again_as_version_3(tmp_path: Path) -> None:
    old = lease("a", DEVICES[0])
    (tmp_path / "leases.json").write_text(json.dumps({"version": 2, "leases": [old.to_json()]}))
    kept = started(tmp_path)
    assert read_back(tmp_path) == each([old])
    document = json.loads((tmp_path / "leases.json").read_text())
    assert (document["version"], document["seq"]) == (3, 0)
    kept.save([])
    assert read_back(tmp_path) == frozenset()


def test_the_journal_is_compacted_once_it_outgrows_its_bound(tmp_path: Path) -> None:
    kept = started(tmp_path)
    sizes = []
    with mock.patch.object(store, "COMPACT_AT", 1000):
        for i in range(50):
            kept.save([lease(f"L{i}", DEVICES[i % 4])])
            sizes.append((tmp_path / "leases.journal").stat().st_size)
    snapshot = (tmp_path / "leases.json").stat().st_size
    assert max(sizes) < max(1000, 4 * snapshot) + 400  # the bound, and one record past it
    assert sizes.count(0) >= 5  # emptied into the snapshot again and again
    assert read_back(tmp_path) == each([lease("L49", DEVICES[1])])


def every_kind_of_lease() -> list[Lease]:
    holder = Holder(pid=4000, start_ticks=123456, boot_id="5d1e3a4b-0000-4000-8000-000000000000")
    return [
        lease("plain", DEVICES[0]),
        attrs.evolve(lease("held", DEVICES[1]), holder=holder),
        attrs.evolve(lease("owned", DEVICES[2]), owner="nomad"),
        attrs.evolve(
            lease("named", DEVICES[3]), devices={DEVICES[3]: "1af4/pci/Ñame: with/slashes ü"}
        ),
        attrs.evolve(lease("bound", "0000:0a:00.0"), connection=7),  # never on disk
    ]


def test_every_kind_of_record_the_writer_writes_is_read_back_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept = started(tmp_path)
    held: list[Lease] = []
    for each_lease in every_kind_of_lease():  # one record each: puts
        held.append(each_lease)
        kept.save(held)
    kept.save(held[1:])  # and a record that ends one
    durable = [x for x in held[1:] if x.durable]
    with caplog.at_level(logging.WARNING):
        assert read_back(tmp_path) == each(durable)  # from the journal
        again = started(tmp_path)  # compacted into the snapshot
        assert each(again.load(no_legacy)) == each(durable)  # from the snapshot
    assert not caplog.records, caplog.text
