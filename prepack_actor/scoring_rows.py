"""Scoring rows for the job (pure, no Ray): parsed rows -> groups -> output rows -> summary.

Input rows come from `rows.parse_*_shard` (id, prompt, error, carry = the other input
columns, pickled); `choices` and `answer` are read from the carry. Rows that cannot be
scored keep an `error` and `error_kind` (rows.ERROR_KINDS, or the scoring kinds
bad_item | bad_prompt | bad_choices | bad_answer | too_long | engine_error) and are never dropped.
"""
from __future__ import annotations

import pickle
from typing import Any

import pyarrow as pa

from .repartition import pack_groups
from .score_items import BadItem
from .scoring import ScoreResult, prepare
from .stages import GROUP_SCHEMA, load_tokenizer, table_to_rows
from .summary import SummaryAccumulator

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("choices", pa.list_(pa.string())),
    ("answer", pa.int64()), ("choice_logprobs", pa.list_(pa.float64())),
    ("choice_num_tokens", pa.list_(pa.int64())), ("choice_is_greedy", pa.list_(pa.bool_())),
    ("pred", pa.int64()), ("pred_norm", pa.int64()), ("correct", pa.bool_()), ("correct_norm", pa.bool_()),
    ("num_input_tokens", pa.int64()), ("shared", pa.bool_()), ("prefill_s", pa.float64()),
    ("pack_rows", pa.int64()), ("pack_efficiency", pa.float64()),
    ("error", pa.string()), ("error_kind", pa.string())])
SUMMARY_COLUMNS = ("error_kind", "num_input_tokens", "pack_efficiency", "prefill_s", "correct", "correct_norm")


def prepare_rows(rows: list[dict], tokenizer, max_context: int | None, mode: str,
                 pack_capacity: int | None) -> list[dict]:
    """Validate and tokenize; adds `item` ((ScoreItem, EncodedItem) or None) and num_input_tokens."""
    out = []
    for row in rows:
        row = dict(row, item=None, num_input_tokens=0)
        if row["error"] is None:
            carry = pickle.loads(row["carry"]) if row.get("carry") else {}
            raw = {"prompt": row["prompt"], "choices": carry.get("choices"), "answer": carry.get("answer")}
            try:
                item, enc = prepare(tokenizer, raw, max_context, pack_capacity)
            except BadItem as e:
                row.update(error=str(e), error_kind=e.kind)
            else:
                row["item"] = (item, enc)
                row["num_input_tokens"] = sum(u.num_tokens for u in enc.units(mode == "shared"))
        out.append(row)
    return out


def group_rows(rows: list[dict], tokenizer, max_context: int | None, mode: str, pack_capacity: int | None,
               token_budget: int, max_rows: int) -> dict[str, list]:
    """One window of parsed rows -> one record per token-bounded group (repartition.pack_groups)."""
    return pack_groups(prepare_rows(rows, tokenizer, max_context, mode, pack_capacity), token_budget, max_rows)


def output_row(row: dict, result: ScoreResult | None = None, error: tuple[str, str] | None = None) -> dict:
    """The written row: carried input columns, then the scoring fields (typed in OUTPUT_SCHEMA)."""
    out = pickle.loads(row["carry"]) if row.get("carry") else {}
    choices, answer = out.pop("choices", None), out.pop("answer", None)
    kind, message = error if error else (row.get("error_kind"), row.get("error"))
    r = result if kind is None else None
    ok_choices = isinstance(choices, list) and all(isinstance(c, str) for c in choices)
    ok_answer = isinstance(answer, int) and not isinstance(answer, bool)
    out.update(
        id=row["id"], prompt=row.get("prompt"), choices=choices if ok_choices else None,
        answer=answer if ok_answer else None,
        choice_logprobs=r.choice_logprobs if r else None, choice_num_tokens=r.choice_num_tokens if r else None,
        choice_is_greedy=r.choice_is_greedy if r else None, pred=r.pred if r else None,
        pred_norm=r.pred_norm if r else None, correct=r.correct if r else None,
        correct_norm=r.correct_norm if r else None, num_input_tokens=r.num_tokens if r else 0,
        shared=r.shared if r else None, prefill_s=r.prefill_s if r else None,
        pack_rows=r.pack_rows if r else None, pack_efficiency=r.pack_efficiency if r else None,
        error=message, error_kind=kind)
    return out


def to_table(rows: list[dict]) -> pa.Table:
    """Output rows -> Arrow: typed fixed columns, then carried columns (types inferred)."""
    cols = {f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in OUTPUT_SCHEMA}
    for k in dict.fromkeys(k for r in rows for k in r if k not in cols):
        cols[k] = pa.array([r.get(k) for r in rows])
    return pa.table(cols)


class ScoreSummary:
    """Counts, accuracy (both rules), tokens and throughput from output columns."""

    def __init__(self):
        self.base = SummaryAccumulator()  # rows, errors by kind, tokens in, pack efficiency
        self.judged = self.correct = self.correct_norm = 0
        self.prefill_s = 0.0

    def add(self, batch: dict[str, Any]) -> None:
        """batch: column name -> list of values (SUMMARY_COLUMNS at least)."""
        batch = {k: list(v) for k, v in batch.items()}
        self.base.add(dict(batch, num_generated_tokens=[0] * len(batch["error_kind"])))
        for kind, c, cn, p in zip(batch["error_kind"], batch["correct"], batch["correct_norm"], batch["prefill_s"]):
            if kind is None:
                self.prefill_s += float(p or 0.0)
                if c is not None:
                    self.judged += 1
                    self.correct += bool(c)
                    self.correct_norm += bool(cn)

    def finish(self, rows_in: int | None, wall_s: float, **extra) -> dict:
        s = self.base.finish(rows_in, wall_s)
        for k in ("tokens_out", "tokens_out_per_s"):  # scoring generates nothing
            s.pop(k, None)
        n = self.judged
        return {**s, "judged": n,
                "accuracy": round(self.correct / n, 6) if n else None,
                "accuracy_norm": round(self.correct_norm / n, 6) if n else None,
                "prefill_s": round(self.prefill_s, 4),
                "tokens_per_s": round(s["tokens_in"] / wall_s, 2) if wall_s > 0 else None,
                "prefill_tokens_per_s": round(s["tokens_in"] / self.prefill_s, 2) if self.prefill_s > 0 else None,
                **extra}


def group_stage(batch: pa.Table, model_path: str, mode: str, pack_capacity: int, token_budget: int,
                max_rows: int) -> pa.Table:
    """Ray Data stage: parsed rows (stages.ROW_SCHEMA) -> group records (stages.GROUP_SCHEMA)."""
    tokenizer, max_context = load_tokenizer(model_path)
    groups = group_rows(table_to_rows(batch), tokenizer, max_context, mode, pack_capacity or None,
                        token_budget, max_rows)
    return pa.table(groups, schema=GROUP_SCHEMA)
