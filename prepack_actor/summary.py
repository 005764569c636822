"""The job summary: counts, tokens, time, throughput, packing (pure, no Ray import).

    acc = SummaryAccumulator()
    for batch in output_batches:           # dicts of columns (pyarrow/pandas/.to_pydict())
        acc.add(batch)
    summary = acc.finish(rows_in=..., wall_s=..., model=..., config=...)
    print(format_table(summary))

Reads only the columns in SUMMARY_COLUMNS, so a job can read them back from its own output.
"""
from __future__ import annotations

from collections import Counter

SUMMARY_COLUMNS = ("error_kind", "num_input_tokens", "num_generated_tokens", "pack_efficiency")


class SummaryAccumulator:
    def __init__(self):
        self.rows_out = 0
        self.errors: Counter[str] = Counter()
        self.tokens_in = self.tokens_out = 0
        self.eff_sum, self.eff_n = 0.0, 0

    def add(self, batch: dict) -> None:
        """batch: column name -> list of values (SUMMARY_COLUMNS at least)."""
        kinds = list(batch["error_kind"])
        self.rows_out += len(kinds)
        self.errors.update(k for k in kinds if k is not None)
        ok = [i for i, k in enumerate(kinds) if k is None]
        self.tokens_in += sum(int(batch["num_input_tokens"][i]) for i in ok)
        self.tokens_out += sum(int(batch["num_generated_tokens"][i]) for i in ok)
        effs = [batch["pack_efficiency"][i] for i in ok]
        self.eff_sum += sum(float(e) for e in effs if e is not None)
        self.eff_n += sum(1 for e in effs if e is not None)

    def finish(self, rows_in: int | None, wall_s: float, **extra) -> dict:
        """The summary dict; `extra` (model, config, output, ...) is added as is."""
        errors = sum(self.errors.values())
        return {
            "rows_in": rows_in, "rows_out": self.rows_out, "rows_ok": self.rows_out - errors,
            "rows_error": errors, "errors_by_kind": dict(sorted(self.errors.items())),
            "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "wall_s": round(wall_s, 3),
            "tokens_out_per_s": round(self.tokens_out / wall_s, 2) if wall_s > 0 else None,
            "mean_pack_efficiency": round(self.eff_sum / self.eff_n, 4) if self.eff_n else None,
            **extra}


def format_table(summary: dict, keys: tuple[str, ...] = (
        "model", "output", "rows_in", "rows_out", "rows_reused", "rows_ok", "rows_error", "errors_by_kind", "tokens_in",
        "tokens_out", "wall_s", "tokens_out_per_s", "mean_pack_efficiency")) -> str:
    """A short two-column table of the headline figures."""
    present = [k for k in keys if k in summary]
    width = max(map(len, present))
    lines = [f"{k:<{width}}  {summary[k]}" for k in present]
    rule = "-" * max(map(len, lines))
    return "\n".join([rule, *lines, rule])
