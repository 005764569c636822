"""Length-aware grouping of rows into actor calls (pure, no Ray import).

Ray Data batches by row count; a prefill pack is bounded by tokens. So the job sorts each
window of rows (a streaming batch, bounded memory, no global shuffle) by prompt length
and cuts it into groups under a token budget and a row cap. Similar lengths land in one
group: packs fill well and decode lengths are alike. Each group then travels as one
record (`pack_groups`) so one actor call sees exactly one group.

    groups = group_by_length([5, 900, 7, 880], token_budget=1000, max_rows=64)
    # [[1], [3, 2, 0]]  longest first; 900 + 880 > 1000 so they split
"""
from __future__ import annotations

import pickle
from typing import Iterator, Sequence


def group_by_length(lengths: Sequence[int], token_budget: int, max_rows: int,
                    sort: bool = True) -> list[list[int]]:
    """Indices into `lengths`, cut into groups of <= max_rows rows and <= token_budget tokens.

    With sort=True rows go longest first, so each group holds neighbours in length. A row
    longer than the budget forms a group of its own (it must still run). Zero-length rows
    (error rows) cost nothing and ride along with any group.
    """
    assert token_budget >= 1 and max_rows >= 1, (token_budget, max_rows)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else range(len(lengths))
    groups: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i in order:
        if cur and (len(cur) >= max_rows or tokens + lengths[i] > token_budget):
            groups.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += lengths[i]
    if cur:
        groups.append(cur)
    return groups


def iter_groups(rows: Sequence[dict], token_budget: int, max_rows: int, sort: bool = True,
                length_key: str = "num_input_tokens") -> Iterator[list[dict]]:
    """Groups of row dicts from one window (see group_by_length)."""
    for g in group_by_length([r[length_key] for r in rows], token_budget, max_rows, sort):
        yield [rows[i] for i in g]


def pack_groups(rows: Sequence[dict], token_budget: int, max_rows: int, sort: bool = True) -> dict[str, list]:
    """One window of rows -> columns with one record per group: rows (pickled), num_rows, num_tokens.

    Error rows go in a group of their own so actor calls that hit the model hold only
    runnable prompts.
    """
    good = [r for r in rows if r.get("error") is None]
    bad = [r for r in rows if r.get("error") is not None]
    groups = list(iter_groups(good, token_budget, max_rows, sort)) + ([bad] if bad else [])
    return {"rows": [pickle.dumps(g) for g in groups],
            "num_rows": [len(g) for g in groups],
            "num_tokens": [sum(r["num_input_tokens"] for r in g) for g in groups]}


def unpack_group(blob: bytes) -> list[dict]:
    return pickle.loads(blob)
