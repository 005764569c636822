"""Resume runs again the error rows whose cause can pass (no Ray import).

    n = release_retryable("s3://bucket/out/", "parquet", storage)   # before resume reads the done ids

Rows whose error_kind is in rows.RETRYABLE_KINDS (out_of_memory, engine_error,
internal_error: memory, the engine or the job's own code, not the row's content) are
removed from the data files and staging files that hold them, so the resumed run treats
their ids as not done and runs them again. Each file is rewritten in place, atomically, or
deleted when nothing else is in it: a crash at any point leaves every row either in a file
(kept) or in none (run again), never in two. Rows with input errors (invalid_json,
prompt_too_long, duplicate_id, ...) stay as they are.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from .config import StorageConfig
from .rows import RETRYABLE_KINDS
from .storage import (UnreadableOutput, filesystem, output_files, read_table, write_bytes_atomic,
                      write_table_atomic)
from .writer import staged_files


def release_retryable(path: str, fmt: str, storage: StorageConfig | None = None) -> int:
    """Remove retryable error rows from the output folder; returns how many were removed."""
    fs, data = output_files(path, fmt, storage)
    proto = path.split("://")[0] + "://" if "://" in path else ""
    files = [(proto + f, fmt) for f in data] + [(f, "parquet") for f in staged_files(path, storage)]
    retry = pa.array(RETRYABLE_KINDS, type=pa.string())
    released = 0
    for f, f_fmt in files:
        try:
            kinds = read_table(f, f_fmt, storage, ["error_kind"]).column("error_kind")
        except Exception as e:  # noqa: BLE001 - name the file a resume cannot read
            raise UnreadableOutput(f"cannot read the output file {f!r}: {type(e).__name__}: "
                                   f"{(str(e).splitlines() or [''])[0][:200]}") from None
        drop = pc.fill_null(pc.is_in(kinds, value_set=retry), False)
        n = pc.sum(drop).as_py() or 0
        if not n:
            continue
        fs_f, root = filesystem(f, storage)
        if f_fmt == "jsonl":  # the kept lines byte for byte (a read-back table may retype values)
            lines = fs_f.cat_file(root).splitlines(keepends=True)
            kept = b"".join(line for line in lines if json.loads(line).get("error_kind") not in RETRYABLE_KINDS)
            left = len(kept)
            if left:
                write_bytes_atomic(kept, f, storage)
        else:
            table = read_table(f, f_fmt, storage).filter(pc.invert(drop))
            left = table.num_rows
            if left:
                write_table_atomic(table, f, f_fmt, storage)
        if not left:
            fs_f.rm(root)
        released += n
    return released
