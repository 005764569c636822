"""What a task supplies to the one pipeline (no Ray import).

A task (generate, score) is small picklable settings plus five answers:
    prepare(row, tokenizer, max_context)   validate + tokenize one parsed row (CPU stage):
                                           sets num_input_tokens and payload, or an error
                                           (prepare_rows: a batch, which may tokenize at once)
    runner(model, tokenizer, packing)      the library object an actor holds (Engine, Scorer)
    run(runner, rows)                      one library call on one group of runnable rows
    output_row(row, result, error)         the written row (typed by output_schema)
    summary_extra(totals, counts, ...)     the summary's task-specific fields
Everything else (read, group, actors, OOM halving, faults, write, resume, summary) is the
pipeline's, written once.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..inputs import BadInput
from .carry import carried_table
from .config import PackingConfig, ProcessorConfig


class Task:
    name: str = ""
    output_schema: pa.Schema  # fixed, typed output columns; carried input columns follow
    summary_columns: tuple[str, ...] = ()  # output columns the summary totals (over rows without error)
    headline: tuple[str, ...] = ()  # summary keys printed at the end of a job
    job_keys: tuple[str, ...] = ()  # config sections that decide the rows' content (resume refuses others)
    sample: str = ""  # bundled input under prepack_actor/data/

    def prepare_row(self, row: dict, tokenizer, max_context: int | None) -> dict:
        """row -> row with num_input_tokens and payload; a BadInput becomes an error row of
        its kind, any other exception an `internal_error` row (never a failed stage)."""
        row = dict(row, num_input_tokens=0, payload=None)
        if row["error"] is None:
            try:
                row.update(self.prepare(row, tokenizer, max_context))
            except BadInput as e:
                row.update(error=e.reason, error_kind=e.kind, num_input_tokens=0, payload=None)
            except Exception as e:  # noqa: BLE001 - the exception boundary is the row
                row.update(error=f"cannot prepare: {type(e).__name__}: {str(e)[:300]}", error_kind="internal_error",
                           num_input_tokens=0, payload=None)
        return row

    def prepare_rows(self, rows: list[dict], tokenizer, max_context: int | None) -> list[dict]:
        """prepare_row over a batch of rows (the prepare stage); a task may tokenize them at once."""
        return [self.prepare_row(r, tokenizer, max_context) for r in rows]

    def prepare(self, row: dict, tokenizer, max_context: int | None) -> dict:
        raise NotImplementedError

    def runner(self, model, tokenizer, packing: PackingConfig) -> Any:
        raise NotImplementedError

    def run(self, runner, rows: list[dict]) -> list:
        raise NotImplementedError

    def output_row(self, row: dict, result=None, error: tuple[str, str] | None = None) -> dict:
        raise NotImplementedError

    def summary_extra(self, totals: dict, counts: dict, tokens_in: int, wall_s: float) -> dict:
        return {}

    def to_table(self, rows: list[dict], carried: pa.Schema | None = None) -> pa.Table:
        """Output rows -> Arrow: the typed fixed columns, then the carried columns, typed by
        the job's carried schema (carry.py; None: from these rows' values)."""
        fixed = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in self.output_schema]
        extra = carried_table(rows, carried, set(self.output_schema.names))
        return pa.Table.from_arrays(fixed + extra.columns, schema=pa.schema(list(self.output_schema) + list(extra.schema)))


def make_task(config: ProcessorConfig) -> Task:
    if config.task == "generate":
        from .generate import GenerateTask
        return GenerateTask(config.sampling, config.prompts)
    from .score import ScoreTask
    return ScoreTask(config.scoring, config.packing.pack_capacity)
