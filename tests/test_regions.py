"""Recycled receive regions: reused only once nothing refers to them, bounded when idle."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from ucxrpc.io import regions
from ucxrpc.io.shared import address_of

MIB = 1 << 20


def test_a_region_is_a_flat_writable_buffer_of_the_size_asked() -> None:
    for size in (regions.MIN_SIZE, 3 * MIB + 7, 16 * MIB):
        view = regions.region(size)
        assert (view.nbytes, view.format, view.ndim, view.readonly) == (size, "B", 1, False)
        view[:3] = b"abc"
        view[-1:] = b"z"
        assert bytes(view[:3]) == b"abc" and view[-1] == ord("z")


@pytest.fixture
def empty_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool of its own for the test (whatever other tests left idle)."""
    monkeypatch.setattr(regions.Regions, "_free", {})
    monkeypatch.setattr(regions.Regions, "idle", 0)
    monkeypatch.setattr(regions.Regions, "limit", 64 * MIB)


@pytest.mark.usefixtures("empty_pool")
def test_a_region_is_reused_only_once_nothing_refers_to_it() -> None:
    first = regions.region(5 * MIB)
    where = address_of(first)
    array = np.frombuffer(first, dtype=np.uint8)  # the application keeps a view of it
    del first
    gc.collect()
    assert regions.Regions.idle == 0  # nothing came back: the array refers to it
    second = regions.region(5 * MIB)
    assert address_of(second) != where
    del array
    gc.collect()
    assert regions.Regions.idle == 8 * MIB  # back in the pool (size class 8 MiB)
    reused = regions.Regions.reused
    third = regions.region(6 * MIB)  # the same size class
    assert address_of(third) == where and regions.Regions.reused == reused + 1
    assert regions.Regions.idle == 0
    del second, third


@pytest.mark.usefixtures("empty_pool")
def test_idle_regions_are_bounded_and_the_rest_unmapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regions.Regions, "limit", 4 * MIB)
    views = [regions.region(4 * MIB) for _ in range(3)]
    addresses = [address_of(v) for v in views]
    del views
    gc.collect()
    assert regions.Regions.idle == 4 * MIB  # one kept, two unmapped
    kept = regions.Regions._free[4 * MIB]
    assert len(kept) == 1 and kept[0] in addresses
    with open("/proc/self/maps") as f:
        starts = {int(line.split("-", 1)[0], 16) for line in f}
    unmapped = [a for a in addresses if a != kept[0]]
    assert not any(a in starts for a in unmapped)  # given back to the kernel
