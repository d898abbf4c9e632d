"""GetPreferredAllocation: which of the available devices a container should get.

The kubelet offers the devices it may hand out (``available``), those it must hand out
(``must_include``, e.g. devices an init container had) and how many (``size``). We prefer, in
this order: all on one NUMA node (the must-include devices' node when there are some, else the
node where the request fits most tightly, leaving bigger free sets whole), then closest on the
PCI tree. The snapshot knows each device's PCI address but not the bridges above it; GPUs behind
one PCIe switch get consecutive bus numbers, so closeness is: same PCI domain, then the distance
between bus numbers, then device and function.

Pure: plain data in, a list of IDs out; always a valid answer (the must-include devices first,
then others from ``available``, never more than ``size``, never an ID not offered).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from monitor.adapters.kubelet.inventory import KubeDevice

FAR = 1 << 20  # another PCI domain, or no address known


def _address(device: KubeDevice | None) -> tuple[int, int, int, int] | None:
    if device is None or device.pci_address is None:
        return None
    domain, bus, slot = device.pci_address.split(":")
    dev, function = slot.split(".")
    return int(domain, 16), int(bus, 16), int(dev, 16), int(function, 16)


def distance(a: KubeDevice | None, b: KubeDevice | None) -> int:
    """How far apart two devices are on the PCI tree, as far as their addresses tell."""
    x, y = _address(a), _address(b)
    if x is None or y is None or x[0] != y[0]:
        return FAR
    return abs(x[1] - y[1]) * 256 + abs(x[2] - y[2]) * 8 + abs(x[3] - y[3])


def _closest(
    chosen: list[str], candidates: Sequence[str], count: int, known: Mapping[str, KubeDevice]
) -> list[str]:
    """``count`` of ``candidates``, each next one the nearest to those already chosen."""
    picked: list[str] = []
    left = list(candidates)
    while left and len(picked) < count:
        around = chosen + picked
        if not around:  # nothing to be near yet: the tightest pair's first device
            best = min(
                left,
                key=lambda c: (
                    min((distance(known.get(c), known.get(o)) for o in left if o != c), default=0),
                    c,
                ),
            )
        else:
            best = min(
                left,
                key=lambda c: (sum(distance(known.get(c), known.get(o)) for o in around), c),
            )
        picked.append(best)
        left.remove(best)
    return picked


def preferred(
    available: Iterable[str],
    must_include: Iterable[str],
    size: int,
    devices: Iterable[KubeDevice],
) -> list[str]:
    """The devices to give, ``must_include`` first."""
    known = {d.id: d for d in devices}
    offered = list(dict.fromkeys(available))
    must = [d for d in dict.fromkeys(must_include) if d in offered][: max(size, 0)]
    wanted = max(size, 0) - len(must)
    rest = sorted(d for d in offered if d not in must)
    if wanted <= 0 or not rest:
        return must

    def node(device_id: str) -> int | None:
        found = known.get(device_id)
        return found.numa_node if found is not None else None

    free = Counter(node(d) for d in rest if node(d) is not None)
    must_nodes = Counter(node(d) for d in must if node(d) is not None)
    if must_nodes:
        # The must-include devices' (most common) node first, then the others, fullest first.
        home = min(must_nodes, key=lambda n: (-must_nodes[n], n))
        order = [home, *sorted((n for n in free if n != home), key=lambda n: (-free[n], n))]
    else:
        fitting = sorted((n for n in free if free[n] >= wanted), key=lambda n: (free[n], n))
        others = sorted((n for n in free if free[n] < wanted), key=lambda n: (-free[n], n))
        order = fitting[:1] + others if fitting else others
    chosen = list(must)
    for numa in [*order, None]:
        on_node = [d for d in rest if node(d) == numa and d not in chosen]
        chosen += _closest(chosen, on_node, max(size, 0) - len(chosen), known)
        if len(chosen) >= size:
            break
    if len(chosen) < size:  # nodes not in the order above (a single fitting node was picked)
        chosen += _closest(chosen, [d for d in rest if d not in chosen], size - len(chosen), known)
    return chosen
