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


def test_a_region_is_reused_only_once_nothing_refers_to_it() -> None:
    first = regions.region(5 * MIB)
    where = address_of(first)
    array = np.frombuffer(first, dtype=np.uint8)  # the application keeps a view of it
    del first
    gc.collect()
    second = regions.region(5 * MIB)
    assert address_of(second) != where  # still referred to by the array: not reused
    del array
    gc.collect()
    reused = regions.Regions.reused
    third = regions.region(6 * MIB)  # the same size class (8 MiB)
    assert address_of(third) == where and regions.Regions.reused == reused + 1
    del second, third


def test_idle_regions_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    gc.collect()
    monkeypatch.setattr(regions.Regions, "limit", regions.Regions.idle + 4 * MIB)
    views = [regions.region(4 * MIB) for _ in range(4)]
    del views
    gc.collect()
    # One more 4 MiB region fitted the limit; the others were unmapped.
    assert regions.Regions.idle <= regions.Regions.limit
