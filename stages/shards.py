"""A training worker's shard of a small split, held in its memory after the first pass.

A split that training keeps decoded (``DataSpec.kept``: at most ``IN_MEMORY_BYTES`` in all)
is read once per worker through Ray Data (its Ray Train shard) and then served from torch
tensors: every epoch is a permutation of the whole shard, drawn from a seeded generator, with
no Ray Data work left to take CPU from training. The order depends only on the seed, the epoch
and the shard, so a resumed run draws the same batches whether its shard was fetched in this
process or before the cut.
"""
from __future__ import annotations

from typing import Iterator

import torch


def whole(source, columns: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every row of a Ray Data dataset or shard, block by block, as one tensor per column."""
    parts: dict[str, list[torch.Tensor]] = {}
    for block in source.iter_torch_batches(batch_size=None):
        for name, values in block.items():
            if columns is None or name in columns:
                parts.setdefault(name, []).append(values)
    return {name: torch.cat(values) for name, values in parts.items()}


def rows_of(rows: dict[str, torch.Tensor]) -> int:
    return len(next(iter(rows.values())))


def batches(rows: dict[str, torch.Tensor], batch_size: int, generator: torch.Generator | None = None,
            pin: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """``rows`` in batches: in order, or permuted by ``generator``; ``pin``: each batch in
    pinned memory (for a non-blocking copy to a GPU)."""
    n = rows_of(rows)
    order = torch.randperm(n, generator=generator) if generator is not None else None
    for start in range(0, n, batch_size):
        if order is None:
            batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        else:
            index = order[start : start + batch_size]
            batch = {k: v[index] for k, v in rows.items()}
        yield {k: v.pin_memory() for k, v in batch.items()} if pin else batch
