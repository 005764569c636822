"""Exactly-once output files of a target size, written while the job runs.

The commit protocol (docs/failure.md):
1. Stage: each group's rows are written by a Ray task to `_staging/part-<hash of its ids>`
   (atomic; a retried group rewrites the same name with the same rows). Readers of the
   output folder never see `_`-prefixed names.
2. Commit: the driver collects staged groups as they finish and, once `rows_per_file` rows
   (or `file_mb` of staged bytes) are pending, writes exactly that many rows as one data
   file `part-<hash of its ids>` (atomic). A data file is the commit point of its rows.
3. Clean: a staging file is deleted once every one of its rows is in a data file.
Any row id already committed is dropped when seen again (a re-executed task, a resumed
run), so no id is ever in two data files. After a crash, the staging files are finished
work: resume counts their ids as done and commits them first (`recover`).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import time

import pyarrow as pa

from .config import StorageConfig
from .storage import filesystem, output_files, read_table, write_table_atomic

STAGING = "_staging"
STAGED_SCHEMA = pa.schema([("file", pa.string()), ("num_rows", pa.int64()), ("num_bytes", pa.int64()),
                           # the actor's account for the summary (fixed cost vs throughput)
                           ("actor", pa.string()), ("load_s", pa.float64()), ("busy_s", pa.float64()),
                           ("allocator", pa.string())])


def part_name(ids: list[str], fmt: str) -> str:
    """A file name fixed by the set of ids it holds (so a rewrite of the same rows replaces it).
    The ids are hashed as a JSON list: ids holding newlines cannot make two sets collide."""
    digest = hashlib.sha1(json.dumps(sorted(ids)).encode()).hexdigest()[:24]
    return f"part-{digest}.{fmt}"


def stage_stage(batch: pa.Table, path: str, storage: StorageConfig | None, actor: str = "", load_s: float = 0.0,
                busy_s: float = 0.0, allocator: str = "") -> pa.Table:
    """Ray Data stage (batch_size=None: one block = one group's rows): stage it as one file.
    actor / load_s (its model load, on its first group only) / busy_s (this call) / allocator
    (its malloc) go to the summary.

    Staging is Parquet whatever output.format is: the table comes back exactly as written."""
    if batch.num_rows == 0:
        return STAGED_SCHEMA.empty_table()
    ids = [str(i) for i in batch.column("id").to_pylist()]
    name = f"{path.rstrip('/')}/{STAGING}/{part_name(ids, 'parquet')}"
    size = write_table_atomic(batch, name, "parquet", storage)
    return pa.table({"file": [name], "num_rows": [batch.num_rows], "num_bytes": [size], "actor": [actor],
                     "load_s": [load_s], "busy_s": [busy_s], "allocator": [allocator]}, schema=STAGED_SCHEMA)


class Committer:
    """The driver's side of the protocol: pending staged rows -> sized data files."""

    def __init__(self, path: str, fmt: str, storage: StorageConfig | None, rows_per_file: int, file_mb: float,
                 committed: set[str] | None = None):
        self.path, self.fmt, self.storage = path.rstrip("/"), fmt, storage
        self.rows_per_file, self.file_bytes = rows_per_file, int(file_mb * 1024 ** 2)
        self.committed: set[str] = set(committed or ())  # ids in data files
        self.pending: list[tuple[str, pa.Table, float]] = []  # (staging file, its uncommitted rows, their bytes)
        self.rows_written = self.files_written = 0
        self.first_file_s: float | None = None
        self.t0 = time.perf_counter()

    def add(self, staged_file: str, num_bytes: int = 0) -> None:
        """A finished staging file: queue its new rows, commit files while enough are pending."""
        table = read_table(staged_file, "parquet", self.storage)
        ids = table.column("id").to_pylist()
        keep = [i not in self.committed for i in ids]
        if not all(keep):  # a re-executed task or a resumed run: those rows are already out
            table = table.filter(pa.array(keep, type=pa.bool_()))
        self.pending.append((staged_file, table, num_bytes * table.num_rows / max(1, len(ids))))
        while self._ready():
            self._commit(self.rows_per_file or self._pending_rows())

    def finish(self) -> None:
        """Commit whatever is pending (the last, smaller file), remove the staging folder and
        give every data file the same schema."""
        while self._pending_rows():
            self._commit(self.rows_per_file or self._pending_rows())
        fs, root = filesystem(f"{self.path}/{STAGING}", self.storage)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        if self.fmt == "parquet":
            unify_schemas(self.path, self.storage)

    def _pending_rows(self) -> int:
        return sum(t.num_rows for _, t, _ in self.pending)

    def _ready(self) -> bool:
        rows, size = self._pending_rows(), sum(b for _, _, b in self.pending)
        return rows > 0 and bool((self.rows_per_file and rows >= self.rows_per_file)
                                 or (self.file_bytes and size >= self.file_bytes))

    def _commit(self, n: int) -> None:
        """Write the first n pending rows as one data file, then drop fully committed staging files."""
        table = pa.concat_tables([t for _, t, _ in self.pending], promote_options="permissive").slice(0, n)
        ids = [str(i) for i in table.column("id").to_pylist()]
        write_table_atomic(table, f"{self.path}/{part_name(ids, self.fmt)}", self.fmt, self.storage)  # commit point
        self.committed.update(ids)
        self.rows_written += table.num_rows
        self.files_written += 1
        if self.first_file_s is None:
            self.first_file_s = time.perf_counter() - self.t0
        rest = []
        for f, t, size in self.pending:
            take = min(n, t.num_rows)
            n -= take
            if take < t.num_rows:
                rest.append((f, t.slice(take), size * (t.num_rows - take) / t.num_rows))
            else:
                fs, root = filesystem(f, self.storage)
                fs.rm(root)  # every row of this staging file is in a data file now
        self.pending = rest


def staged_files(path: str, storage: StorageConfig | None = None) -> list[str]:
    """Staging files left by an interrupted run (finished groups not yet in data files)."""
    fs, root = filesystem(f"{path.rstrip('/')}/{STAGING}", storage)
    if not fs.exists(root):
        return []
    proto = path.split("://")[0] + "://" if "://" in path else ""
    return sorted(proto + p for p in fs.find(root) if posixpath.basename(p).startswith("part-")
                  and p.endswith(".parquet"))


def unify_schemas(path: str, storage: StorageConfig | None = None) -> int:
    """Rewrite (same name, atomically) each Parquet data file whose schema lacks a column that
    others have, so every reader sees one schema (a carried column absent from a whole file
    is null there). Returns the number of files rewritten."""
    import pyarrow.parquet as pq
    fs, files = output_files(path, "parquet", storage)
    schemas = {}
    for f in files:
        with fs.open(f, "rb") as fh:
            schemas[f] = pq.read_schema(fh).remove_metadata()
    if len({str(s) for s in schemas.values()}) <= 1:
        return 0
    unified = pa.unify_schemas(list(schemas.values()), promote_options="permissive")
    proto = path.split("://")[0] + "://" if "://" in path else ""
    rewritten = 0
    for f, schema in schemas.items():
        if schema.equals(unified):
            continue
        table = read_table(f, "parquet", storage, fs=fs)
        cols = [table.column(n).cast(t.type) if n in schema.names else pa.nulls(table.num_rows, t.type)
                for n, t in zip(unified.names, unified)]
        write_table_atomic(pa.table(cols, schema=unified), proto + f, "parquet", storage)
        rewritten += 1
    return rewritten
