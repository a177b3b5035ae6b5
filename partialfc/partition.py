"""How the class-centre matrix is split into per-rank shards.

The partition is a pure function of ``(num_classes, rank, world_size)`` so that every rank,
the checkpoint code and the tests agree on it without talking to each other, and so that it can
be tested for many world sizes without a process group.
"""

from __future__ import annotations

from common.checks import check_int

__all__ = ["class_range"]


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return ``(class_start, count)`` of the shard of class centres owned by ``rank``.

    Shards are contiguous and in rank order. Counts differ by at most one: the first
    ``num_classes % world_size`` ranks own one extra class. Contiguity keeps the global-to-local
    label mapping a subtraction, and the balanced split keeps per-rank memory equal.

    When ``num_classes < world_size`` the last ranks get ``count == 0``; callers that cannot work
    with an empty shard must reject that themselves.

    Raises:
        ValueError: ``num_classes < 1``, ``world_size < 1``, ``rank`` outside
            ``[0, world_size)``, or a non-int argument; the message names the argument.
    """
    # Integers only (bools rejected): a float class count never slips through.
    num_classes = check_int("num_classes", num_classes, minimum=1)
    rank = check_int("rank", rank)
    world_size = check_int("world_size", world_size, minimum=1)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    base, extra = divmod(num_classes, world_size)
    count = base + (1 if rank < extra else 0)
    # Ranks before `rank` each own `base` classes, and min(rank, extra) of them own one more.
    start = rank * base + min(rank, extra)
    return start, count
