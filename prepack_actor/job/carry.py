"""Carried input columns: one Arrow type per column for a whole job (no Ray import).

    sig = signature(value)                        # per value: "int", "string", ("list", ...), JSON, ...
    sigs = {name: unify(a, b) ...}                # over every row of every shard (scan.py)
    schema = carried_schema(sigs)                 # the carried part of every output file
    table = carried_table(rows, schema, skip)     # the carried columns of output rows, in schema order

The rule (docs/failure.md, "Every row is data"): a carried column keeps a native Arrow type
when all its values agree on one: strings, booleans, integers within int64, floats (ints
and floats together are floats while every int is exact in a double, |i| <= 2^53), lists
whose elements agree, and objects (structs: the union of their keys, each key agreeing).
Any other column (types that differ between rows, an integer beyond 64 bits, NaN or
infinity, an empty object, an empty or non-string key) is written as the JSON text of each
value (json.loads gives the value back), in every file, and its Parquet field carries the
metadata `prepack.carried = json`. The jobs decide the schema once from the whole input
before any work (scan.py), so every data file has the same schema whatever its rows.
"""
from __future__ import annotations

import json
import math
from functools import reduce
from typing import Any, Union

import pyarrow as pa

JSON = "json"  # the signature of a column stored as JSON text
Sig = Union[str, tuple]
JSON_META = {b"prepack.carried": b"json"}
_EXACT = 2 ** 53  # integers a double holds exactly
_INT64 = (-2 ** 63, 2 ** 63 - 1)


def signature(v: Any) -> Sig:
    """The type one value asks for: null, bool, int (|v| <= 2^53), int64, float, string,
    ("list", elem), ("struct", ((key, sig), ...)), ("arrow", pa.DataType) for other Arrow
    values (Parquet timestamps, decimals, bytes), or JSON."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int" if -_EXACT <= v <= _EXACT else "int64" if _INT64[0] <= v <= _INT64[1] else JSON
    if isinstance(v, float):
        return "float" if math.isfinite(v) else JSON
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        elem = reduce(unify, map(signature, v), "null")
        return JSON if elem == JSON else ("list", elem)
    if isinstance(v, dict):
        if not v or not all(isinstance(k, str) and k for k in v):
            return JSON
        fields = tuple((k, signature(x)) for k, x in v.items())
        return JSON if any(s == JSON for _, s in fields) else ("struct", fields)
    try:
        return ("arrow", pa.scalar(v).type)
    except Exception:  # noqa: BLE001 - a value Arrow has no type for
        return JSON


def unify(a: Sig, b: Sig) -> Sig:
    """The one type two signatures share, or JSON when they have none."""
    if a == b:
        return a
    if a == "null" or b == "null":
        return b if a == "null" else a
    if JSON in (a, b):
        return JSON
    pair = {a, b} if isinstance(a, str) and isinstance(b, str) else set()
    if pair == {"int", "int64"}:
        return "int64"
    if pair == {"int", "float"}:
        return "float"
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "list":
        elem = unify(a[1], b[1])
        return JSON if elem == JSON else ("list", elem)
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "struct":
        fields = dict(a[1])
        for k, s in b[1]:
            fields[k] = unify(fields[k], s) if k in fields else s
        return JSON if JSON in fields.values() else ("struct", tuple(fields.items()))
    return JSON


def arrow_type(sig: Sig) -> pa.DataType:
    if sig == JSON or sig == "string":
        return pa.string()
    if isinstance(sig, str):
        return {"null": pa.null(), "bool": pa.bool_(), "int": pa.int64(), "int64": pa.int64(),
                "float": pa.float64()}[sig]
    if sig[0] == "list":
        return pa.list_(arrow_type(sig[1]))
    if sig[0] == "struct":
        return pa.struct([(k, arrow_type(s)) for k, s in sig[1]])
    return sig[1]


def sig_text(sig: Sig) -> str:
    """A signature as stable text (kept in _carried.json, compared on resume)."""
    return sig if sig == JSON else str(arrow_type(sig))


def carried_schema(sigs: dict[str, Sig]) -> pa.Schema:
    return pa.schema([pa.field(k, arrow_type(s), metadata=JSON_META if s == JSON else None)
                      for k, s in sigs.items()])


def is_json(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(b"prepack.carried") == b"json"


def json_text(v: Any) -> str | None:
    return None if v is None else json.dumps(v, ensure_ascii=False, default=str)


def batch_sigs(rows: list[dict], skip: set[str] | frozenset = frozenset()) -> dict[str, Sig]:
    """Each key's unified signature over rows (keys in order of first appearance)."""
    names = dict.fromkeys(k for r in rows for k in r if k not in skip)
    return {k: reduce(unify, (signature(r.get(k)) for r in rows), "null") for k in names}


def carried_table(rows: list[dict], schema: pa.Schema | None, skip: set[str]) -> pa.Table:
    """The carried columns of output rows (every key not in `skip`), typed by the job's
    schema; without one (a user's Dataset in the stage) each column's type comes from this
    batch's values by the same rule."""
    if schema is None:
        schema = carried_schema(batch_sigs(rows, skip))
    extra = {k for r in rows for k in r if k not in skip} - set(schema.names)
    assert not extra, f"carried columns outside the job's schema: {sorted(extra)}"  # scan.py saw every row
    fields = [f for f in schema if f.name not in skip]
    arrays = [pa.array([json_text(r.get(f.name)) for r in rows] if is_json(f) else [r.get(f.name) for r in rows],
                       type=f.type) for f in fields]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


CARRIED_NAME = "_carried.json"  # beside the outputs: each carried column's type, for resume


def carried_record(sigs: dict[str, Sig], old: dict | None = None) -> dict:
    """What _carried.json holds: column -> type text (an earlier run's columns kept)."""
    columns = dict((old or {}).get("columns", {}))
    columns.update({k: sig_text(s) for k, s in sigs.items() if k not in columns or sig_text(s) != "null"})
    return {"columns": columns}


def carried_conflicts(old: dict | None, sigs: dict[str, Sig]) -> list[str]:
    """Columns whose type differs from the one an earlier run wrote ("meta: int64 -> json")."""
    before = (old or {}).get("columns", {})
    return [f"{k}: {before[k]} -> {sig_text(s)}" for k, s in sigs.items()
            if k in before and sig_text(s) not in (before[k], "null")]
