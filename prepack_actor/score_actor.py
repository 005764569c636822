"""The Ray Data scoring actor: a thin shell over `Scorer` (one model load per actor).

    ds.map_batches(ScoreActor, batch_size=1, batch_format="pyarrow",
                   fn_constructor_kwargs=dict(model_path=..., mode="shared", ...),
                   compute=ray.data.ActorPoolStrategy(size=n), num_gpus=g, num_cpus=c)

Input batch: group records (repartition.GROUP_SCHEMA: pickled row dicts made by
`scoring_rows.group_rows`). Output: one row per input row (`scoring_rows.output_row`).
Error rows pass through without touching the model; an exception from the model turns
that group's rows into engine_error rows.
"""
from __future__ import annotations

import pyarrow as pa
import torch

from .loading import load_model
from .model_source import resolve_model_path
from .repartition import unpack_group
from .scoring import ScoreConfig, Scorer
from .scoring_rows import output_row, to_table


class ScoreActor:
    def __init__(self, model_path: str, model_cache_dir: str, dtype: str = "auto", device: str = "auto",
                 attn_implementation: str = "sdpa", mode: str = "shared", length_norm: str = "chars",
                 pack_capacity: int = 0, token_budget: int = 4096, torch_threads: int = 0):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        model, tokenizer = load_model(resolve_model_path(model_path, model_cache_dir), dtype, device,
                                      attn_implementation)
        # The job already grouped rows under the budget; the scorer must not split further.
        self.scorer = Scorer(model, tokenizer, ScoreConfig(
            mode=mode, pack_capacity=pack_capacity or None, max_group_tokens=max(token_budget, 1),
            length_norm=length_norm))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for blob in batch.column("rows").to_pylist():
            out.extend(self.run_group(unpack_group(blob)))
        return to_table(out)

    def run_group(self, rows: list[dict]) -> list[dict]:
        """Score the runnable rows of one group; error rows pass through."""
        good = [r for r in rows if r["error"] is None]
        out = [output_row(r) for r in rows if r["error"] is not None]
        if not good:
            return out
        try:
            results = self.scorer.score_prepared([r["item"] for r in good])
        except Exception as e:  # noqa: BLE001 - one bad group must not kill the job
            msg = f"scoring failed on this group: {type(e).__name__}: {e}"
            return out + [output_row(r, error=("engine_error", msg)) for r in good]
        return out + [output_row(r, res) for r, res in zip(good, results)]
