"""The job summary: counts, tokens, time, throughput, packing, task fields (no Ray import).

    acc = SummaryAccumulator(task.summary_columns)
    for batch in output_batches:           # dicts of columns (pyarrow .to_pydict())
        acc.add(batch)
    summary = acc.finish(task, rows_in=..., wall_s=..., model=..., config=...)
    print(format_table(summary, task.headline))

Reads only `columns()`, so a job can read them back from its own output.
"""
from __future__ import annotations

from collections import Counter

BASE_COLUMNS = ("error_kind", "num_input_tokens", "pack_efficiency")


class SummaryAccumulator:
    def __init__(self, task_columns: tuple[str, ...] = ()):
        self.task_columns = task_columns
        self.rows_out = 0
        self.errors: Counter[str] = Counter()
        self.tokens_in = 0
        self.eff_sum, self.eff_n = 0.0, 0
        # sum over rows without error (True = 1; a list adds its length)
        self.totals: dict[str, float] = {c: 0 for c in task_columns}
        self.counts: dict[str, int] = {c: 0 for c in task_columns}  # non-null values among them

    def columns(self) -> list[str]:
        return list(BASE_COLUMNS) + [c for c in self.task_columns if c not in BASE_COLUMNS]

    def add(self, batch: dict) -> None:
        """batch: column name -> list of values (columns() at least)."""
        kinds = list(batch["error_kind"])
        self.rows_out += len(kinds)
        self.errors.update(k for k in kinds if k is not None)
        ok = [i for i, k in enumerate(kinds) if k is None]
        self.tokens_in += sum(int(batch["num_input_tokens"][i]) for i in ok)
        effs = [batch["pack_efficiency"][i] for i in ok]
        self.eff_sum += sum(float(e) for e in effs if e is not None)
        self.eff_n += sum(1 for e in effs if e is not None)
        for c in self.task_columns:
            values = [batch[c][i] for i in ok if batch[c][i] is not None]
            self.totals[c] += sum(len(v) if isinstance(v, (list, tuple)) else float(v) for v in values)
            self.counts[c] += len(values)

    def finish(self, task, rows_in: int | None, wall_s: float, **extra) -> dict:
        """The summary dict: common counts, the task's fields, then `extra` as is."""
        errors = sum(self.errors.values())
        return {
            "rows_in": rows_in, "rows_out": self.rows_out, "rows_ok": self.rows_out - errors,
            "rows_error": errors, "errors_by_kind": dict(sorted(self.errors.items())),
            "tokens_in": self.tokens_in, "wall_s": round(wall_s, 3),
            "mean_pack_efficiency": round(self.eff_sum / self.eff_n, 4) if self.eff_n else None,
            **task.summary_extra(self.totals, self.counts, self.tokens_in, wall_s), **extra}


def format_table(summary: dict, keys: tuple[str, ...]) -> str:
    """A short two-column table of the headline figures."""
    present = [k for k in keys if k in summary]
    width = max(map(len, present))
    lines = [f"{k:<{width}}  {summary[k]}" for k in present]
    rule = "-" * max(map(len, lines))
    return "\n".join([rule, *lines, rule])
