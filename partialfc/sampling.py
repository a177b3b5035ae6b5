"""The shard's random parts: the seeded initial class centres (identical for every world
size) and each step's sampled columns (positives plus uniform negatives)."""

from __future__ import annotations

import hashlib
import math

import torch

__all__ = ["INIT_BLOCK_ROWS", "init_class_centers", "mixed_seed", "sample_columns"]


def mixed_seed(tag: str, *parts: int) -> int:
    """Deterministic 63-bit seed from a tag and integers (stable across runs and machines).

    A hash rather than arithmetic such as ``seed * K + i``, so that different (seed, i) pairs
    cannot collide into the same stream.
    """
    text = ":".join([tag, *(str(int(p)) for p in parts)]).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


INIT_BLOCK_ROWS = 1024
"""Rows per independently seeded block of the initial class-centre matrix.

Part of the reproducibility contract: row i of the initial matrix depends only on
``(seed, i // INIT_BLOCK_ROWS, i % INIT_BLOCK_ROWS, embedding_size, init_std)``, so the full
matrix is the same for every world size. Changing it changes every initialisation.
"""


def init_class_centers(
    start: int,
    count: int,
    embedding_size: int,
    seed: int = 0,
    std: float = 0.01,
    block_rows: int = INIT_BLOCK_ROWS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial rows ``[start, start + count)`` of the class-centre matrix -> [count, D] ``dtype``.

    Values are normal(0, std), generated on CPU block by block: block b (rows
    ``[b*block_rows, (b+1)*block_rows)``) comes from its own generator seeded by ``(seed, b)``.
    A rank therefore only generates the blocks overlapping its shard (memory
    O((count + block_rows) * D) instead of O(num_classes * D)) and still gets exactly the rows a
    single process would hold. Each block is drawn in float32 and written into the ``dtype``
    result (bfloat16 / float16: rounded to nearest, as ``.to(dtype)`` of the float32 matrix),
    so a 16-bit shard never has a float32 copy beside it.
    """
    if count < 0 or start < 0:
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    out = torch.empty(count, embedding_size, dtype=dtype)  # [count, D]
    if count == 0:
        return out
    stop = start + count
    for block in range(start // block_rows, (stop - 1) // block_rows + 1):
        gen = torch.Generator().manual_seed(mixed_seed("init", seed, block))
        rows = torch.empty(block_rows, embedding_size, dtype=torch.float32)  # [block_rows, D]
        rows.normal_(0.0, std, generator=gen)
        lo = max(start, block * block_rows)
        hi = min(stop, (block + 1) * block_rows)
        out[lo - start : hi - start] = rows[lo - block * block_rows : hi - block * block_rows]
    return out


def _largest_sorted(keys: torch.Tensor, k: int, num_above_one: int) -> torch.Tensor:
    """Ascending indices of the ``k`` largest ``keys`` [n]: ``num_above_one`` keys above 1
    (the positives), the rest uniform in [0, 1) (one draw each).

    The same set as ``topk(keys, k).indices.sort()`` at a fraction of its cost: the top k
    are all among the keys above a threshold that about ``k`` plus a few standard deviations
    of the uniform keys exceed (fallback to the full top-k in the rare case too few do), and
    a mask over those candidates, which ``nonzero`` returns in order, replaces the sort.
    """
    n = keys.numel()
    if k >= n:
        return torch.arange(n, device=keys.device)
    need, pool = k - num_above_one, n - num_above_one
    threshold = 1.0 - (need + 4.0 * math.sqrt(max(need, 0)) + 16.0) / max(pool, 1)
    if threshold > 0.0:
        candidates = torch.nonzero(keys > threshold).squeeze(1)  # ascending
        if candidates.numel() >= k:
            picked = torch.topk(keys[candidates], k, sorted=False).indices
            keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=keys.device)
            keep[picked] = True
            return candidates[keep]
    return torch.topk(keys, k, sorted=False).indices.sort().values


def sample_columns(
    local_labels: torch.Tensor,
    is_local: torch.Tensor,
    num_local: int,
    sample_rate: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """This step's sampled index of the shard [S] (None: every row, at rate 1) and each
    global row's target column [N] (-1 where its class lives on another rank).

    ``local_labels`` [N] are the labels less the shard's first class, ``is_local`` [N] where
    they fall in the shard. Every positive is kept; random negatives fill up to
    ``round(sample_rate * num_local)`` rows (at least one row in all).
    """
    device = local_labels.device
    if sample_rate >= 1.0:
        return None, torch.where(is_local, local_labels, -1)  # [N]
    positives = torch.unique(local_labels[is_local])  # [P], sorted
    num_pos = int(positives.numel())
    # At least one row: a rank with no positives and a budget that rounds to 0 would
    # otherwise have no columns at all (an empty softmax part and an empty gradient).
    num_sample = min(num_local, max(int(round(sample_rate * num_local)), num_pos, 1))
    # Random keys on CPU from the seeded generator (same stream on CPU and GPU runs);
    # positives get a key above every random key, so top-k keeps them all and fills the
    # rest with a uniform sample without replacement of the other rows.
    keys = torch.rand(num_local, generator=generator).to(device)  # [C_r]
    keys[positives] = 2.0
    index = _largest_sorted(keys, num_sample, num_pos)  # [S]
    # A local label is always sampled; its column is its rank in the sorted index.
    column = torch.searchsorted(index, local_labels.clamp(0, num_local - 1))
    return index, torch.where(is_local, column, -1)  # [S], [N]
