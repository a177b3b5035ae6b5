"""The class partition: contiguous, disjoint, covering, balanced; bad arguments rejected."""

from __future__ import annotations

import pytest

from partialfc.partition import class_range

WORLDS = list(range(1, 9))
CLASS_COUNTS = [1, 7, 10, 1000, 85742]


def _check_partition(num_classes: int, world: int) -> None:
    ranges = [class_range(num_classes, r, world) for r in range(world)]
    expected_start = 0
    for start, count in ranges:
        assert start == expected_start  # contiguous, disjoint, in rank order
        assert count >= 0
        expected_start = start + count
    assert expected_start == num_classes  # covers [0, C) exactly
    counts = [c for _, c in ranges]
    assert max(counts) - min(counts) <= 1
    extra = num_classes % world
    base = num_classes // world
    # The first C % W ranks carry the extra class.
    assert counts == [base + 1] * extra + [base] * (world - extra)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_partition_covers_classes(num_classes: int, world: int) -> None:
    _check_partition(num_classes, world)


@pytest.mark.parametrize("world", WORLDS)
def test_partition_not_divisible(world: int) -> None:
    num_classes = 13 * world + world - 1 if world > 1 else 13
    assert world == 1 or num_classes % world != 0
    _check_partition(num_classes, world)


def test_partition_known_values() -> None:
    # 10 classes over 3 ranks: 4 + 3 + 3.
    assert [class_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    # MS1MV2 over 8 GPUs: 85742 = 8 * 10717 + 6.
    assert class_range(85742, 0, 8) == (0, 10718)
    assert class_range(85742, 5, 8) == (5 * 10718, 10718)
    assert class_range(85742, 6, 8) == (6 * 10718, 10717)
    assert class_range(85742, 7, 8) == (6 * 10718 + 10717, 10717)
    # Fewer classes than ranks: trailing ranks are empty.
    assert class_range(1, 3, 4) == (1, 0)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0, 0, 1), "num_classes"),
        ((-5, 0, 1), "num_classes"),
        ((10.0, 0, 1), "num_classes"),
        ((True, 0, 1), "num_classes"),
        ((10, 0, 0), "world_size"),
        ((10, 0, -2), "world_size"),
        ((10, 0, 2.0), "world_size"),
        ((10, -1, 2), "rank"),
        ((10, 2, 2), "rank"),
        ((10, "0", 2), "rank"),
    ],
)
def test_partition_rejects_bad_arguments(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        class_range(*args)
