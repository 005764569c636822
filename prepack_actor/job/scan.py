"""The jobs' pre-pass over the input: exact row counts, repeated ids, the carried schema.

    scan = scan_input(fs, shards, skip=set(task.output_schema.names))
    scan.rows_in          # rows of every shard; each shard's count is one task's return value,
                          # so a retried task cannot count its shard twice
    scan.repeats          # shard path -> {row index: (k, where the id was first seen)}
    scan.carried          # pa.Schema of the carried columns (carry.py: one type per column)

One Ray task per shard parses it (rows.py, the same parse the job runs later) and returns
its row count, a 128-bit hash of each row's id, where each row is, the ids of the form
`<base>#<k>`, and each carried column's signature. The driver then finds repeated ids
exactly and deterministically: rows sorted by (id hash, shard order, row order); the first
row of each id keeps it, the j-th repeat becomes `<id>#<k>` with k the j-th integer >= 1
for which `<id>#<k>` is not an input id. The driver holds 24 bytes per input row (10M rows:
240 MB) and no id text. docs/failure.md ("Duplicate ids") has the policies.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from .carry import Sig, batch_sigs, carried_schema, unify
from .rows import iter_jsonl_shard, iter_parquet_shard

_SUFFIXED = re.compile(r"^(.*)#([1-9][0-9]{0,17})$", re.S)


def id_hash(row_id: str) -> bytes:
    return hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass
class ShardScan:
    path: str
    name: str
    unit: str  # "line" (JSONL) | "row" (Parquet): what positions count
    rows: int
    hashes: np.ndarray  # [rows, 2] uint64: each row's id hash
    positions: np.ndarray  # [rows] int64: its line (JSONL) or record index (Parquet)
    suffixed: list[tuple[int, int, int]]  # (base hash hi, lo, k) for ids "<base>#<k>"
    sigs: dict[str, Sig]  # carried column -> signature over the shard


@dataclass
class InputScan:
    rows_in: int = 0
    repeats: dict[str, dict[int, tuple[int, str]]] = field(default_factory=dict)
    carried: pa.Schema = field(default_factory=lambda: pa.schema([]))
    sigs: dict[str, Sig] = field(default_factory=dict)

    @property
    def num_repeats(self) -> int:
        return sum(len(r) for r in self.repeats.values())


def scan_shard(data: bytes, path: str, name: str, fmt: str, skip: set[str]) -> ShardScan:
    parse = iter_parquet_shard if fmt == "parquet" else iter_jsonl_shard
    digests, positions, suffixed, sigs = [], [], [], {}
    for pos, row in parse(data, name):
        digests.append(id_hash(row["id"]))
        positions.append(pos)
        m = _SUFFIXED.match(row["id"])
        if m:
            hi, lo = np.frombuffer(id_hash(m.group(1)), dtype="<u8")
            suffixed.append((int(hi), int(lo), int(m.group(2))))
        for k, sig in batch_sigs([row["carry"]], skip).items():
            sigs[k] = unify(sigs[k], sig) if k in sigs else sig
    hashes = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)
    return ShardScan(path, name, "row" if fmt == "parquet" else "line", len(positions), hashes,
                     np.asarray(positions, dtype=np.int64), suffixed, sigs)


@ray.remote(num_cpus=1)
def _scan_task(fs, path: str, name: str, fmt: str, skip: set[str]) -> ShardScan:
    return scan_shard(fs.cat_file(path), path, name, fmt, skip)


def scan_input(fs, shards: list[tuple[str, str]], names: dict[str, str], skip: set[str]) -> InputScan:
    """Scan every shard (one Ray task each, retried by Ray like any task) and combine."""
    scans = ray.get([_scan_task.remote(fs, p, names[p], fmt, skip) for p, fmt in shards])
    return combine(scans)


def combine(scans: list[ShardScan]) -> InputScan:
    sigs: dict[str, Sig] = {}
    for s in scans:  # shard order: columns in order of first appearance
        for k, sig in s.sigs.items():
            sigs[k] = unify(sigs[k], sig) if k in sigs else sig
    return InputScan(sum(s.rows for s in scans), find_repeats(scans), carried_schema(sigs), sigs)


def find_repeats(scans: list[ShardScan]) -> dict[str, dict[int, tuple[int, str]]]:
    """shard path -> {row index: (k, where the id was first seen)} for every row whose id an
    earlier row (in shard order, then row order) already has."""
    counts = [s.rows for s in scans]
    if sum(counts) < 2:
        return {}
    h = np.concatenate([s.hashes for s in scans])
    order = np.lexsort((h[:, 1], h[:, 0]))  # stable: equal ids stay in input order
    hs = h[order]
    repeat = np.r_[False, (hs[1:] == hs[:-1]).all(axis=1)]
    if not repeat.any():
        return {}
    run_start = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(hs))))
    shard_of = np.repeat(np.arange(len(scans)), counts)
    offsets = np.r_[0, np.cumsum(counts)[:-1]]
    taken: dict[tuple[int, int], set[int]] = {}
    for s in scans:
        for hi, lo, k in s.suffixed:
            taken.setdefault((hi, lo), set()).add(k)

    def where(g: int) -> str:
        s = scans[shard_of[g]]
        return f"{s.name} {s.unit} {int(s.positions[g - offsets[shard_of[g]]])}"

    out: dict[str, dict[int, tuple[int, str]]] = {}
    last_k: dict[int, int] = {}
    for i in np.nonzero(repeat)[0]:
        start = int(run_start[i])
        used = taken.get((int(hs[i, 0]), int(hs[i, 1])), set())
        k = last_k.get(start, 0) + 1
        while k in used:
            k += 1
        last_k[start] = k
        g = int(order[i])
        out.setdefault(scans[shard_of[g]].path, {})[g - int(offsets[shard_of[g]])] = (k, where(int(order[start])))
    return out
