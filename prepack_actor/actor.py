"""The Ray Data actor: a thin shell over `Engine` (one model load per actor).

    ds.map_batches(PrepackActor, batch_size=1, batch_format="pyarrow",
                   fn_constructor_kwargs=dict(model_path=..., ...),
                   compute=ray.data.ActorPoolStrategy(size=n), num_gpus=g, num_cpus=c)

Input batch: records made by `repartition.pack_groups` (columns rows: pickled list of row
dicts, num_rows, num_tokens); each record is one token-bounded group. Output: one row
per input row (`rows.output_row`). Error rows pass through without touching the model; a
group that runs out of memory is halved and retried (`oom.generate_splitting`; a prompt
that does not fit alone becomes an out_of_memory row); any other exception from the
engine turns that group's rows into engine_error rows. `faults` is the test-only fault
plan (`faults.FaultPlan.to_dict()`), None in normal runs.
"""
from __future__ import annotations

import pyarrow as pa
import torch

from .engine import Engine, EngineConfig
from .faults import FaultPlan
from .loading import load_model
from .model_source import resolve_model_path
from .oom import generate_splitting
from .repartition import unpack_group
from .rows import output_row
from .sampling import SamplingParams

# Fixed output columns and their types (a batch of only error rows must not write nulls
# of type null, or shards would disagree on the schema). Carried columns follow.
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("generated_text", pa.string()),
    ("finish_reason", pa.string()), ("num_input_tokens", pa.int64()),
    ("num_truncated_tokens", pa.int64()), ("num_generated_tokens", pa.int64()),
    ("prefill_s", pa.float64()), ("ttft_s", pa.float64()), ("decode_s", pa.float64()),
    ("pack_rows", pa.int64()), ("pack_efficiency", pa.float64()),
    ("error", pa.string()), ("error_kind", pa.string())])


def to_table(rows: list[dict]) -> pa.Table:
    """Output rows -> Arrow: typed fixed columns, then carried columns (types inferred)."""
    cols = {f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in OUTPUT_SCHEMA}
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in cols))
    for k in extra:
        cols[k] = pa.array([r.get(k) for r in rows])
    return pa.table(cols)


class PrepackActor:
    def __init__(self, model_path: str, model_cache_dir: str, dtype: str = "auto", device: str = "auto",
                 attn_implementation: str = "sdpa", pack_capacity: int = 0, token_budget: int = 4096,
                 max_rows: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 stop: list[str] | None = None, ignore_eos: bool = False, torch_threads: int = 0,
                 faults: dict | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        path = resolve_model_path(model_path, model_cache_dir)
        model, tokenizer = load_model(path, dtype, device, attn_implementation)
        # The job already grouped rows under the budgets; the engine must not split further.
        self.engine = Engine(model, tokenizer, EngineConfig(
            pack_capacity=pack_capacity or None, max_group_prompts=max_rows,
            max_group_tokens=max(token_budget, 1)))
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k,
                             stop=list(stop or []), ignore_eos=ignore_eos)
        self.faults = FaultPlan(**faults) if faults else FaultPlan()
        self.groups_done = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for blob in batch.column("rows").to_pylist():
            self.faults.before_group(self.groups_done)
            out.extend(self.run_group(unpack_group(blob)))
            self.groups_done += 1
        return to_table(out)

    def run_group(self, rows: list[dict]) -> list[dict]:
        """Generate for the runnable rows of one group; error rows pass through."""
        good = [r for r in rows if r["error"] is None]
        out = [output_row(r) for r in rows if r["error"] is not None]
        if not good:
            return out
        params = [SamplingParams(max_new_tokens=r["max_new_tokens"], seed=r["seed"], **self.sampling)
                  for r in good]
        ids = [r["input_ids"] for r in good]
        try:
            results = [None] * len(good)
            for g in self.engine.groups([len(x) for x in ids]):
                for i, res in zip(g, generate_splitting(self.engine.generate_group, [ids[i] for i in g],
                                                        [params[i] for i in g], self.faults.before_prefill)):
                    results[i] = res
        except Exception as e:  # noqa: BLE001 - one bad group must not kill the job
            msg = f"engine failed on this group: {type(e).__name__}: {e}"
            return out + [output_row(r, error=("engine_error", msg)) for r in good]
        return out + [output_row(r, error=("out_of_memory", f"does not fit alone: {type(res).__name__}: {res}"))
                      if isinstance(res, BaseException) else output_row(r, res) for r, res in zip(good, results)]
