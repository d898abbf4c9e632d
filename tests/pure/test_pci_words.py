"""Generated sentences read right: the article before a PCI class's name."""

from __future__ import annotations

import attrs
import pytest

from monitor.core.answers import Refusal
from monitor.core.events import DeviceSeen
from monitor.core.pci import class_phrase
from tests.pure.examples import NIC, decide, reserve, run


@pytest.mark.parametrize(
    ("pci_class", "phrase"),
    [
        (0xFF0000, "an unassigned class"),
        (0x000000, "an unclassified device"),
        (0x090000, "an input device controller"),
        (0x0E0000, "an intelligent controller"),
        (0x100000, "an encryption controller"),
        (0x060400, "a bridge"),
        (0x020000, "a network controller"),
        (0x120000, "a processing accelerator"),
        (0x420000, "a device of an unknown class"),
    ],
)
def test_a_class_is_named_with_its_article(pci_class: int, phrase: str) -> None:
    assert class_phrase(pci_class) == phrase


def test_a_refusal_names_a_device_not_followed_with_the_right_article() -> None:
    virtio = attrs.evolve(NIC, address="0000:00:04.0", pci_class=0xFF0000)
    state, _ = run(DeviceSeen(virtio))
    request = reserve(virtio.address)
    refused = decide(state, request).answers[request.token]
    assert isinstance(refused, Refusal)
    assert refused.message.startswith(
        "0000:00:04.0 is not followed: it is an unassigned class (class 0xff0000)"
    )
