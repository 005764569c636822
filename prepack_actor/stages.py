"""Ray Data stage functions: pyarrow batch in, pyarrow batch out (no Ray import).

Rows travel between stages in ROW_SCHEMA; see `rows` for the meaning of each field.

    tokenize_stage(batch, model_path=..., max_new_tokens=..., ...)  adds input_ids, num_input_tokens
    group_stage(batch, token_budget=..., max_rows=...)               one record per group (repartition)
"""
from __future__ import annotations

import pickle
from functools import lru_cache

import pyarrow as pa

from .repartition import pack_groups
from .rows import tokenize_rows

ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("messages", pa.binary()),  # pickled list | null
    ("max_new_tokens", pa.int64()), ("seed", pa.int64()), ("error", pa.string()),
    ("error_kind", pa.string()), ("carry", pa.binary())])  # pickled dict of carried columns
TOKENIZED_SCHEMA = pa.schema(list(ROW_SCHEMA) + [
    ("input_ids", pa.list_(pa.int64())), ("num_input_tokens", pa.int64()),
    ("num_truncated_tokens", pa.int64())])
GROUP_SCHEMA = pa.schema([("rows", pa.binary()), ("num_rows", pa.int64()), ("num_tokens", pa.int64())])


def rows_to_table(rows: list[dict], schema: pa.Schema = ROW_SCHEMA) -> pa.Table:
    cols = {}
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if f.name == "messages":
            values = [pickle.dumps(v) if v is not None else None for v in values]
        cols[f.name] = pa.array(values, type=f.type)
    return pa.table(cols, schema=schema)


def table_to_rows(table: pa.Table) -> list[dict]:
    rows = table.to_pylist()
    for r in rows:
        if r.get("messages") is not None:
            r["messages"] = pickle.loads(r["messages"])
    return rows


@lru_cache(maxsize=2)
def load_tokenizer(path: str):
    """(tokenizer, max_context) for a resolved checkpoint path; cached per worker process."""
    from transformers import AutoConfig, AutoTokenizer

    from .prompts import context_length
    return AutoTokenizer.from_pretrained(path), context_length(AutoConfig.from_pretrained(path))


def tokenize_stage(batch: pa.Table, model_path: str, max_new_tokens: int, base_seed: int,
                   over_long: str, max_prompt_tokens: int) -> pa.Table:
    tokenizer, max_context = load_tokenizer(model_path)
    rows = tokenize_rows(table_to_rows(batch), tokenizer, max_context, max_new_tokens, base_seed,
                         over_long, max_prompt_tokens)
    return rows_to_table(rows, TOKENIZED_SCHEMA)


def group_stage(batch: pa.Table, token_budget: int, max_rows: int, sort: bool = True) -> pa.Table:
    return pa.table(pack_groups(table_to_rows(batch), token_budget, max_rows, sort), schema=GROUP_SCHEMA)
