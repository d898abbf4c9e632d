"""GetPreferredAllocation: which of the available devices a container should get.

The kubelet offers the devices it may hand out (``available``), those it must hand out
(``must_include``, e.g. devices an init container had) and how many (``size``). We prefer, in
this order: all on one NUMA node (the must-include devices' node when there are some, else the
node where the request fits most tightly, leaving bigger free sets whole), then closest on the
PCI tree. The snapshot knows each device's PCI address but not the bridges above it; GPUs behind
one PCIe switch get consecutive bus numbers, so closeness is: same PCI domain, then the distance
between bus numbers, then device and function.

Pure: plain data in, a list of IDs out, in O(n²) at most for n devices offered (1,024 in about
the time docs/performance.md's benchmark gives); always a valid answer (the must-include devices
first, then others from ``available``, never more than ``size``, never an ID not offered).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from monitor.adapters.kubelet.inventory import KubeDevice

FAR = 1 << 20  # another PCI domain, or no address known


Address = tuple[int, int, int, int]


def _address(device: KubeDevice | None) -> Address | None:
    if device is None or device.pci_address is None:
        return None
    domain, bus, slot = device.pci_address.split(":")
    dev, function = slot.split(".")
    return int(domain, 16), int(bus, 16), int(dev, 16), int(function, 16)


def _apart(x: Address | None, y: Address | None) -> int:
    if x is None or y is None or x[0] != y[0]:
        return FAR
    return abs(x[1] - y[1]) * 256 + abs(x[2] - y[2]) * 8 + abs(x[3] - y[3])


def distance(a: KubeDevice | None, b: KubeDevice | None) -> int:
    """How far apart two devices are on the PCI tree, as far as their addresses tell."""
    return _apart(_address(a), _address(b))


def _tightest(candidates: Sequence[str], at: Mapping[str, Address | None]) -> str:
    """The first (by ID) of the devices in the closest pair. Each term of the distance
    outweighs all lower ones together (a bus apart is more than any device and function
    apart), so of three addresses in order the outer two are never the closest pair: closest
    pairs are neighbours in address order, and one sort finds them."""
    placed = sorted((a, c) for c in candidates if (a := at.get(c)) is not None)
    gaps = [(_apart(x, y), cx, cy) for (x, cx), (y, cy) in itertools.pairwise(placed)]
    nearest = min((g for g, _, _ in gaps), default=FAR)
    if len(candidates) < 2 or nearest >= FAR:  # no pair nearer than another domain
        return min(candidates)
    return min(c for g, cx, cy in gaps if g == nearest for c in (cx, cy))


def _closest(
    chosen: list[str], candidates: Sequence[str], count: int, at: Mapping[str, Address | None]
) -> list[str]:
    """``count`` of ``candidates``, each next one the nearest (by the sum of distances) to
    those already chosen. Each candidate's sum is kept and grown by one distance per pick:
    O(candidates x count)."""
    if count >= len(candidates):
        return list(candidates)  # all of them: nothing to choose
    left = dict.fromkeys(candidates, 0)
    picked: list[str] = []
    around = chosen if chosen else [_tightest(candidates, at)]
    for anchor in around:
        where = at.get(anchor)
        for c in left:
            left[c] += _apart(at.get(c), where)
    if not chosen:  # the tightest pair's first device is the first pick
        picked.append(around[0])
        del left[around[0]]
    while left and len(picked) < count:
        best = min(left, key=lambda c: (left[c], c))
        picked.append(best)
        del left[best]
        where = at.get(best)
        for c in left:
            left[c] += _apart(at.get(c), where)
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
    offered_set = set(offered)
    must = [d for d in dict.fromkeys(must_include) if d in offered_set][: max(size, 0)]
    wanted = max(size, 0) - len(must)
    rest = sorted(set(offered) - set(must))
    if wanted <= 0 or not rest:
        return must

    at = {d: _address(known.get(d)) for d in offered}

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
        taken = set(chosen)
        on_node = [d for d in rest if node(d) == numa and d not in taken]
        chosen += _closest(chosen, on_node, max(size, 0) - len(chosen), at)
        if len(chosen) >= size:
            break
    if len(chosen) < size:  # nodes not in the order above (a single fitting node was picked)
        taken = set(chosen)
        chosen += _closest(chosen, [d for d in rest if d not in taken], size - len(chosen), at)
    return chosen
