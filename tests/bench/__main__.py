"""Run the benchmarks: ``python -m tests.bench [--quick] [--json OUT] [--only 1,4] [--against REV]
[--profile]``.

Prints one table (Markdown, so it pastes into docs/performance.md) and writes every figure, with the
machine's details, to a JSON file. Latencies are p50 / p99 / max over at least 1,000 samples in
a full run; comparisons are ratios measured in the same run, on the same events where possible.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monitor.sim.umockdev import umockdev_missing
from tests.bench import (
    exporter,
    fanout,
    health_sweep,
    kernel,
    kmsg,
    kubelet,
    lifecycle,
    nomad,
    nvml_hotplug,
    preferred,
    reserve,
    simulated,
    snapshot_size,
    telemetry,
)
from tests.bench.common import (
    Daemon,
    Results,
    Row,
    machine,
    pick_pci_device,
    source_version,
)
from tests.bench.profile import print_summary
from tests.sysfs import sysfs_truth

DEFAULT_JSON = Path(__file__).resolve().with_name("results.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer samples, no 100k storm, no 10,000 subscribers, 5 s idle instead of 60 s",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    parser.add_argument(
        "--only", default=",".join(map(str, range(1, 18))), help="scenarios to run, e.g. 1,4"
    )
    parser.add_argument(
        "--against",
        metavar="REVISION",
        help="scenarios 1 (the kernel path) and 5 (connection-bound pairs) also run this tree's "
        "daemon against the daemon of a git revision (a temporary worktree), alternating, and "
        "say whether it is worse beyond the noise",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also attach py-spy to the daemon under load (storm, fan-out, reservations) and "
        "print the functions that take its time",
    )
    return parser.parse_args(argv)


def print_table(results: Results) -> None:
    print("\n| scenario | measure | result (latency: p50 / p99 / max) | target | verdict |")
    print("| --- | --- | --- | --- | --- |")
    for row in results.rows:
        print(f"| {row.scenario} | {row.metric} | {row.value} | {row.target} | {row.verdict} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {int(part) for part in args.only.split(",") if part.strip()}
    quick: bool = args.quick
    samples = 300 if quick else 2000  # per latency in scenarios 1 and 2
    pairs = 1000 if quick else 10_000  # per connection count in scenario 5
    idle_seconds = 5.0 if quick else 60.0
    results = Results()
    profiles: dict[str, Any] | None = {} if args.profile else None
    info = machine()
    info["source"] = source_version()
    print(
        f"hotplug-monitor benchmarks ({'quick' if quick else 'full'} run) on {info['nproc']} x "
        f"{info['cpu_model']}, kernel {info['kernel']}, Python {info['python']}"
    )
    started = time.monotonic()
    device = pick_pci_device()
    no_kernel = "needs root and a PCI device with a writable uevent file"
    no_sim = umockdev_missing()

    def skipped(scenario: str, why: str) -> None:
        results.add(Row(scenario, "not run", why, verdict="n/a"))

    def guarded(scenario: str, run: Callable[[], None]) -> None:
        """Run one scenario; if it fails, say so in the table and go on with the others."""
        try:
            run()
        except Exception as exc:
            traceback.print_exc()
            results.add(Row(scenario, "failed", f"{type(exc).__name__}: {exc}"[:300], "", "ERROR"))

    def kernel_scenario(number: int, name: str, run: Callable[[str, str], None]) -> None:
        if number not in only:
            return
        if device is None:
            skipped(name, no_kernel)
            return
        address, pci_class = device
        guarded(name, lambda: run(address, pci_class))

    with tempfile.TemporaryDirectory(prefix="hotplug-bench-") as tmp:
        work = Path(tmp)
        kernel_scenario(
            1, "1 kernel event -> subscriber",
            lambda address, cls: kernel.kernel_to_subscriber(
                results, work / "s1", address, cls, samples, quick
            ),
        )  # fmt: skip
        kernel_scenario(
            1, "1 kernel event -> subscriber",
            lambda address, cls: kernel.cdi_cost(
                results, work / "s1-cdi", address, cls, samples, quick
            ),
        )  # fmt: skip

        if args.against:
            kernel_scenario(
                1, "1 kernel event -> subscriber",
                lambda address, cls: kernel.kernel_against(
                    results, work / "s1-against", address, cls, samples, quick, args.against
                ),
            )  # fmt: skip

        floor_rates: dict[tuple[str, int], float] = {}

        def floor(disk: str, connections: int) -> float:
            """A floor's pairs/s, measured once per run, when first needed."""
            if not floor_rates:
                floor_rates.update(reserve.floors(results, work / "s5-floor", (1, 8), pairs))
            if (disk, connections) not in floor_rates:
                floor_rates.update(
                    reserve.floors(results, work / "s5-floor", (connections,), pairs)
                )
            return floor_rates[disk, connections]

        def simulated_reservations(sim: simulated.TimedSimulator) -> None:
            devices = [address for _, address in simulated.EIGHT_GPUS]
            rates = {}
            # (folder, tune, label, connection-bound): the node-check fix is compared where no
            # disk write hides it, with connection-bound leases; then the default, durable ones.
            for folder, tune, label, bind in (
                ("s5-before", "nodes-uncached",
                 "8 simulated GPUs, connection-bound, before: a stat per node per request", True),
                ("s5-bound", None, "8 simulated GPUs, connection-bound leases (not written)", True),
                ("s5", None, "8 simulated GPUs, durable leases (on disk before each answer)",
                 False),
            ):  # fmt: skip
                with Daemon(work / folder, ["--udev-source", "udev"], env=sim.daemon_env(),
                            log_level="warning", tune=tune) as daemon:  # fmt: skip
                    rates[folder] = reserve.reservations(
                        results, daemon, devices, pairs, quick, label,
                        None if bind else profiles, bind=bind,
                    )  # fmt: skip
            if args.against:
                reserve.pairs_against(
                    results, work / "s5-against", sim.daemon_env(), devices, pairs,
                    args.against, 8 if quick else 16,
                )  # fmt: skip
            before, after = rates["s5-before"], rates["s5-bound"]
            for connections in after:
                ratio = after[connections] / before[connections]
                results.add(
                    Row("5 reservations",
                        f"ratio pairs/s after / before, {connections} connection(s)",
                        f"x{ratio:.2f}", data={"ratio": ratio}),
                )  # fmt: skip
            # (leases, connections, floor, its connections, target): the targets
            # compare like with like; the 8-against-1 row shows what group commit gains.
            for folder, count, disk, floor_count, target in (
                ("s5", 1, "thread", 1, 0.70),
                ("s5", 8, "thread", 8, 1.0),
                ("s5", 8, "thread", 1, None),
                ("s5-bound", 1, "none", 1, 0.50),
                ("s5-bound", 8, "none", 8, None),
            ):
                leases = "durable" if folder == "s5" else "connection-bound"
                floor_name = "fdatasync floor" if disk == "thread" else "bare floor"
                reserve.against_floor(
                    results, f"ratio {leases}, {count} connection(s) / {floor_name}, "
                    f"{floor_count} connection(s)", rates[folder][count],
                    floor(disk, floor_count), target,
                )  # fmt: skip

        if only & {2, 5, 6, 9}:
            if no_sim:
                for number in (2, 5, 6, 9):
                    if number in only:
                        skipped(str(number), no_sim)
            else:
                sim = simulated.simulated(simulated.EIGHT_GPUS)
                try:
                    if 2 in only:
                        guarded(
                            "2 simulated udev event -> subscriber",
                            lambda: simulated.udev_to_subscriber(
                                results, work / "s2", sim, samples, quick
                            ),
                        )
                        guarded(
                            "2 kernel log XID line -> subscriber",
                            lambda: simulated.kmsg_to_subscriber(
                                results, work / "s2b", sim, samples, quick
                            ),
                        )
                        guarded(
                            "2 simulated udev event -> subscriber",
                            lambda: simulated.change_cdi_cost(
                                results, work / "s2-cdi", sim, samples, quick
                            ),
                        )
                    if 5 in only:
                        guarded("5 reservations", lambda: simulated_reservations(sim))
                    if 6 in only:
                        guarded(
                            "6 idle cost",
                            lambda: simulated.idle(results, work / "s6", sim, idle_seconds),
                        )
                    if 9 in only:
                        ends = "9 how soon things end"
                        guarded(ends, lambda: lifecycle.lease_ends(
                            results, work / "s9", sim.daemon_env(), simulated.EIGHT_GPUS[0][1],
                            100 if quick else 1000, quick,
                        ))  # fmt: skip
                        guarded(ends, lambda: lifecycle.shutdown(
                            results, work / "s9-stop", sim.daemon_env(), 2 if quick else 10
                        ))  # fmt: skip
                finally:
                    sim.close()

        def real_reservations(address: str, cls: str) -> None:
            # The same requests on real PCI functions: no umockdev preload on every path lookup
            # and no device nodes to check, so this is the protocol's own cost.
            args = ["--udev-source", "kernel", "--match-class", cls]
            with Daemon(work / "s5-kernel", args, log_level="warning") as daemon:
                devices = sorted(sysfs_truth(cls))
                rates = reserve.reservations(
                    results, daemon, devices, pairs, quick,
                    f"{len(devices)} real virtio PCI functions (no device nodes), durable leases",
                    profiles,
                )  # fmt: skip
            reserve.against_floor(
                results, "ratio real PCI functions, durable, 1 connection / fdatasync floor",
                rates[1], floor("thread", 1), 0.70,
            )  # fmt: skip

        kernel_scenario(5, "5 reservations", real_reservations)

        def storms(address: str, cls: str) -> None:
            sizes = [20_000] if quick else [20_000, 100_000]
            for events in sizes:
                # The default; the former 64 MiB default (before); the smallest, sure to overflow.
                for buffer in (None, 64 * 1024 * 1024, 65536):
                    folder = work / f"s3-{events}-{buffer}"
                    run = functools.partial(
                        kernel.storm, results, folder, address, cls, events, buffer
                    )
                    guarded("3 storm", run)
            if profiles is not None:
                profiles["storm of 100,000 uevents"] = kernel.storm_cpu_profile(
                    work / "s3-profile", cls, address, 100_000
                )

        kernel_scenario(3, "3 storm", storms)
        kernel_scenario(
            4, "4 fan-out",
            lambda address, cls: fanout.fanout(
                results, work / "s4", address, cls, [1000] if quick else [1000, 10_000],
                2 if quick else 10, quick, profiles,
            ),
        )  # fmt: skip
        kernel_scenario(
            4, "4 fan-out",
            lambda address, cls: fanout.gc_before_after(
                results, work / "s4-gc", address, cls, [1000] if quick else [1000, 10_000],
                2 if quick else 10, quick,
            ),
        )  # fmt: skip
        if 7 in only:
            if no_sim:
                skipped("7 start-up", no_sim)
            else:
                starts = 20 if quick else 1000
                guarded(
                    "7 start-up", lambda: simulated.startup(results, work / "s7", starts, quick)
                )

        if 8 in only:
            if no_sim:
                skipped("8 telemetry", no_sim)
            else:
                window = 5.0 if quick else 20.0
                guarded("8 telemetry", lambda: telemetry.telemetry(results, work / "s8", window))

        if 14 in only:
            if no_sim:
                skipped(nvml_hotplug.SCENARIO, no_sim)
            else:
                hot_adds = 30 if quick else 200
                guarded(
                    nvml_hotplug.SCENARIO,
                    lambda: nvml_hotplug.nvml_hot_add(results, work / "s14", hot_adds),
                )

        if 10 in only:
            if no_sim:
                skipped(nomad.SCENARIO, no_sim)
            else:
                guarded(
                    nomad.SCENARIO,
                    lambda: nomad.nomad_plugin(
                        results, work / "s10", 300 if quick else 1000, 3 if quick else 20, quick
                    ),
                )

        if 11 in only:
            if no_sim:
                skipped(exporter.SCENARIO, no_sim)
            else:
                guarded(
                    exporter.SCENARIO,
                    lambda: exporter.exporter(
                        results, work / "s11", 200 if quick else 1000, 5.0 if quick else 20.0
                    ),
                )

        if 12 in only:
            if no_sim:
                skipped(kubelet.SCENARIO, no_sim)
            else:
                guarded(
                    kubelet.SCENARIO,
                    lambda: kubelet.kubelet_plugin(
                        results, work / "s12", 300 if quick else 1000, 3 if quick else 20, quick
                    ),
                )

        if 13 in only:
            guarded(
                preferred.SCENARIO,
                lambda: preferred.preferred(results, 100 if quick else 1000, quick),
            )

        # Scenarios 15-17, the cost of the NVIDIA features (issue 31).
        for number, module, run in (
            (15, health_sweep, lambda: health_sweep.health_sweep(
                results, work / "s15", 8.0 if quick else 30.0)),
            (16, kmsg, lambda: kmsg.kmsg_reader(
                results, work / "s16", samples, idle_seconds if quick else 30.0, quick, profiles)),
            (17, snapshot_size, lambda: snapshot_size.snapshot_size(
                results, work / "s17", 100 if quick else 1000)),
        ):  # fmt: skip
            if number in only and no_sim:
                skipped(module.SCENARIO, no_sim)
            elif number in only:
                guarded(module.SCENARIO, run)

    # In scenario order (they run in the order that shares set-up).
    results.rows.sort(key=lambda row: int(row.scenario.split()[0]))
    print_table(results)
    for title, summary in (profiles or {}).items():
        print_summary(title, summary)
    for note in results.notes:
        print(f"- {note}")
    elapsed = time.monotonic() - started
    document = {
        "command": shlex.join(["python", "-m", "tests.bench", *(argv or sys.argv[1:])]),
        "mode": "quick" if quick else "full",
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(elapsed, 1),
        "machine": info,
        "rows": [asdict(row) for row in results.rows],
        "notes": results.notes,
        "profiles": profiles,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {args.json} ({elapsed:.0f} s)")
    missed = [row.metric for row in results.rows if row.verdict == "MISSED"]
    print(f"targets missed: {len(missed)}" + "".join(f"\n  - {m}" for m in missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
