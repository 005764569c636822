"""Files on local disk or object storage through fsspec (no Ray import).

    fs, root = filesystem("s3://bucket/out/", storage)   # S3 retries from storage.max_attempts
    write_table_atomic(table, "s3://bucket/out/part-ab12.parquet", "parquet", storage)
    write_json(summary, "s3://bucket/out/_summary.json", storage)       # atomic too
    for table in read_output("s3://bucket/out/", "parquet", storage, columns=[...]): ...

Atomicity: a local file is written under a temporary name (`_tmp-...`, which no reader
lists) and renamed into place; an S3 object appears whole at the end of its PUT (or of
its multipart upload), so it is written in place. Readers never see half a file.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

from .config import StorageConfig

SUMMARY_NAME = "_summary.json"  # written beside the output shards, last; never read as one
JSONL_TEXT_COLUMNS = pa.schema([("id", pa.string()), ("error", pa.string()), ("error_kind", pa.string())])
EXTENSIONS = {"jsonl": (".jsonl", ".json", ".jsonl.gz"), "parquet": (".parquet", ".pq")}


def filesystem(path: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path without protocol) with S3 options from config or env.

    S3 requests that fail transiently (throttling, 5xx, dropped connections) are retried by
    botocore up to `storage.max_attempts` times with backoff (`storage.retry_mode`).
    """
    storage = storage or StorageConfig()
    protocol = fsspec.core.split_protocol(path)[0]
    opts: dict = {}
    if protocol in ("s3", "s3a"):
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client = {k: v for k, v in (("endpoint_url", endpoint), ("region_name", storage.region)) if v}
        opts = {"anon": storage.anon, "client_kwargs": client,
                "config_kwargs": {"retries": {"max_attempts": storage.max_attempts, "mode": storage.retry_mode}}}
    fs, root = fsspec.core.url_to_fs(path, **opts)
    return fs, root


def arrow_fs(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow view Ray Data reads and writes through (the same fsspec object, picklable)."""
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_bytes_atomic(data: bytes, path: str, storage: StorageConfig | None = None, create: bool = False) -> int:
    """Write a whole file so that no reader sees it half written (see module doc); returns its size.

    create=True writes only if nothing is at `path` (else FileExistsError), atomically too:
    locally a hard link of the complete temporary file, on S3 a conditional PUT (If-None-Match)."""
    fs, root = filesystem(path, storage)
    if not is_local(fs):
        fs.pipe_file(root, data, **({"mode": "create"} if create else {}))  # one PUT: atomic per object
        return len(data)
    fs.makedirs(posixpath.dirname(root), exist_ok=True)
    tmp = posixpath.join(posixpath.dirname(root), f"_tmp-{uuid.uuid4().hex}-{posixpath.basename(root)}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if create:
        try:
            os.link(tmp, root)  # fails when root exists
        finally:
            os.unlink(tmp)
    else:
        os.replace(tmp, root)  # atomic on POSIX; a retried writer of the same name just replaces it
    return len(data)


def table_bytes(table: pa.Table, fmt: str) -> bytes:
    """A table as a Parquet file or JSON lines (nested carried columns stay nested)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()
    assert fmt == "jsonl", fmt
    return "".join(json.dumps(r, default=str) + "\n" for r in table.to_pylist()).encode()


def write_table_atomic(table: pa.Table, path: str, fmt: str, storage: StorageConfig | None = None) -> int:
    return write_bytes_atomic(table_bytes(table, fmt), path, storage)


def output_files(path: str, fmt: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Data files under path: nothing under a `_`/`.` name (metadata, staging, temp files), as
    pandas, pyarrow.dataset, Spark and Ray Data skip them too."""
    fs, root = filesystem(path, storage)
    if not fs.exists(root):
        return fs, []
    root = root.rstrip("/")
    return fs, sorted(p for p in fs.find(root) if p.endswith(EXTENSIONS[fmt])
                      and not any(part.startswith(("_", ".")) for part in p[len(root):].split("/")))


def read_table(path: str, fmt: str, storage: StorageConfig | None = None, columns: list[str] | None = None,
               fs=None) -> pa.Table:
    """One output file as a pyarrow table (only `columns` when given)."""
    import pyarrow.json as pajson
    import pyarrow.parquet as pq
    if fs is None:
        fs, path = filesystem(path, storage)
    with fs.open(path, "rb") as fh:
        if fmt == "parquet":
            return pq.read_table(fh, columns=columns)
        # One block for the whole file: a row longer than a block ("straddling object") cannot
        # be parsed, and rows carry prompts and columns of any size.
        # Ids and errors are text whatever they look like (pyarrow infers "2024-01-01" as a timestamp).
        block = max(1 << 20, min(fs.size(path) + 1, 2 ** 31 - 1))
        table = pajson.read_json(fh, read_options=pajson.ReadOptions(block_size=block),
                                 parse_options=pajson.ParseOptions(explicit_schema=JSONL_TEXT_COLUMNS))
        return table.select(columns) if columns else table


class UnreadableOutput(OSError):
    """A data file of the output that cannot be read; the message names it."""


def read_output(path: str, fmt: str, storage: StorageConfig | None = None, columns: list[str] | None = None):
    """Iterate a job's output as pyarrow tables, one per data file (only `columns` when given).
    A file that cannot be read raises UnreadableOutput naming it."""
    fs, files = output_files(path, fmt, storage)
    for f in files:
        try:
            table = read_table(f, fmt, storage, columns, fs=fs)
        except Exception as e:  # noqa: BLE001 - truncated, corrupt, not ours: name the file
            raise UnreadableOutput(f"cannot read the output file {f!r}: {type(e).__name__}: "
                                   f"{(str(e).splitlines() or [''])[0][:200]}") from None
        yield table


def write_json(obj: dict, path: str, storage: StorageConfig | None = None) -> None:
    """A JSON file written atomically (_summary.json is written this way, last)."""
    write_bytes_atomic(json.dumps(obj, indent=2, default=str).encode(), path, storage)


def read_json(path: str, storage: StorageConfig | None = None) -> dict | None:
    fs, root = filesystem(path, storage)
    return json.loads(fs.cat_file(root)) if fs.exists(root) else None
