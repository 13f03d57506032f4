"""Best-fit-decreasing packing: the same rows as `training.data.pack_documents`, with far less padding.

Greedy in-order packing closes a row as soon as the next document does not fit; with log-normal lengths
(median 200, tail to 2048) that leaves about 16% of a 2048-token row as padding, which is compute spent on
nothing. Placing the longest documents first, each into the fullest row that still has room, leaves well
under 1%. Rows have the layout `pack_documents` makes (position_ids restart per document, labels -100 on
each document's first token and on padding), so the attention and collators are unchanged. Pure.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from tune_launch.training.data import IGNORE, _pad_row


def best_fit_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`, longest first, each into the tightest fit."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        else:
            bins.append([i])
            b, room = len(bins) - 1, capacity - n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def pack_best_fit(docs: Sequence[Sequence[int]], max_length: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Rows of exactly max_length from token lists; a longer document is cut into max_length pieces first."""
    pieces = [doc[i:i + max_length] for doc in docs for i in range(0, len(doc), max_length)]
    pieces = [p for p in pieces if len(p) >= 2]  # nothing to predict otherwise
    rows = []
    for group in best_fit_bins([len(p) for p in pieces], max_length):
        ids: list[int] = []
        pos: list[int] = []
        labels: list[int] = []
        for i in sorted(group):  # keep the corpus order inside a row
            piece = list(pieces[i])
            ids.extend(piece)
            pos.extend(range(len(piece)))
            labels.extend([IGNORE, *piece[1:]])
        rows.append(_pad_row(ids, pos, labels, max_length, pad_id))
    return rows
