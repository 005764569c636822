"""Prompts -> token ids -> the batches every method runs, and the paper's predictors.

One `Workload` per (dataset, batch size): a seeded random sample of
`num_batches x batch_size` prompts. Full batching and prepacking run its random
batches; length-ordered batching runs the same prompts sorted by length, then cut.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .baselines import length_ordered_batches
from ..core.packing import ffd


def read_prompts(path: str | Path) -> list[str]:
    """The `prompt` (or `text`) column of a JSONL or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datasets: no such file {str(path)!r}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        col = "prompt" if "prompt" in table.column_names else "text"
        return [str(x) for x in table.column(col).to_pylist()]
    with path.open(encoding="utf-8") as f:  # not str.splitlines: it also splits at U+2028 inside strings
        rows = [json.loads(line) for line in f if line.strip()]
    return [str(r["prompt"] if "prompt" in r else r["text"]) for r in rows]


def dataset_name(path: str | Path) -> str:
    return Path(path).name.split(".")[0]


@dataclass
class Workload:
    dataset: str
    batch_size: int
    prompts: list[list[int]]  # the sample's token ids, num_batches x batch_size prompts
    random_batches: list[list[int]]  # indices into `prompts` (full batching, prepacking)
    ordered_batches: list[list[int]]  # the same indices sorted by length, then cut

    def batches(self, method: str) -> list[list[list[int]]]:
        """Token-id batches a method runs; length_ordered gets the sorted cut."""
        idx = self.ordered_batches if method == "length_ordered" else self.random_batches
        return [[self.prompts[i] for i in b] for b in idx]


def make_workload(dataset: str, token_ids: list[list[int]], batch_size: int, num_batches: int,
                  seed: int) -> Workload:
    """Draw num_batches x batch_size prompts with a fixed seed (without replacement if possible)."""
    g = torch.Generator().manual_seed(seed)
    n = batch_size * num_batches
    if n <= len(token_ids):
        chosen = torch.randperm(len(token_ids), generator=g)[:n].tolist()
    else:
        chosen = torch.randint(len(token_ids), (n,), generator=g).tolist()
    prompts = [token_ids[i] for i in chosen]
    random_b = [list(range(i, i + batch_size)) for i in range(0, n, batch_size)]
    ordered_b = length_ordered_batches([len(p) for p in prompts], batch_size)
    return Workload(dataset, batch_size, prompts, random_b, ordered_b)


def padded_tokens(lengths: list[int]) -> int:
    return len(lengths) * max(lengths)


def ideal_speedup(batches: list[list[int]]) -> float:
    """Padded tokens / real tokens over a set of batches (lengths): speedup with zero padding."""
    return sum(padded_tokens(b) for b in batches) / sum(sum(b) for b in batches)


def max_abs_deviation(lengths: list[int]) -> float:
    """The paper's predictor: max |length - mean length| within a batch."""
    mean = sum(lengths) / len(lengths)
    return max(abs(n - mean) for n in lengths)


def packed_rows(lengths: list[int], capacity_multiple: float = 1.0, min_width: int = 0) -> int:
    """Rows after FFD packing at capacity = max(multiple x the longest prompt, min_width)."""
    return len(ffd(lengths, max(int(capacity_multiple * max(lengths)), min_width)))


def batch_size_reduction(lengths: list[int], capacity_multiple: float = 1.0, min_width: int = 0) -> float:
    """The paper's predictor: rows before packing / rows after."""
    return len(lengths) / packed_rows(lengths, capacity_multiple, min_width)


def predictors(batches: list[list[int]], capacity_multiple: float = 1.0, min_width: int = 0) -> dict:
    """Per-workload padding statistics (means over batches) for one method's batches."""
    k = len(batches)
    return {
        "ideal_speedup": ideal_speedup(batches),
        "real_tokens": sum(sum(b) for b in batches),
        "padded_tokens": sum(padded_tokens(b) for b in batches),
        "batch_size_reduction": sum(batch_size_reduction(b, capacity_multiple, min_width) for b in batches) / k,
        "max_abs_deviation": sum(max_abs_deviation(b) for b in batches) / k,
    }
