"""Merging per-rank evaluation rows on rank 0, checked to hold every item exactly once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Optional

import torch.distributed as dist


class EvaluationCoverageError(RuntimeError):
    """An item was evaluated twice, or not at all: the numbers would be wrong, so none are written."""


def gather_to_rank0(payload: Any) -> Optional[list[Any]]:
    """Every rank's ``payload``, in rank order, on rank 0 (``None`` on the others); ``[payload]`` without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everything: list = [None] * dist.get_world_size()
        dist.all_gather_object(everything, payload)
        return everything if dist.get_rank() == 0 else None
    return [payload]


def check_exactly_once(rows: Iterable[dict], key: Callable[[dict], Hashable], expected: Optional[Iterable[Hashable]] = None, what: str = "item") -> None:
    """Raise :class:`EvaluationCoverageError` when a key repeats, or when an ``expected`` key has no row."""
    counts = Counter(key(r) for r in rows)
    repeated = [k for k, n in counts.items() if n > 1]
    if repeated:
        raise EvaluationCoverageError(f"{len(repeated)} {what}(s) were evaluated more than once (e.g. {repeated[0]!r}, {counts[repeated[0]]} times): the per-rank split repeats items")
    if expected is not None:
        missing = [k for k in expected if k not in counts]
        if missing:
            raise EvaluationCoverageError(f"{len(missing)} {what}(s) were never evaluated (e.g. {missing[0]!r}): the per-rank split misses items")
