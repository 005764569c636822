"""The generation task: prompts (or chat messages) in, completions with timings out (no Ray)."""
from __future__ import annotations

from dataclasses import asdict

import pyarrow as pa

from ..core.sampling import SamplingParams
from ..engine import Engine, EngineConfig, GenerationResult
from ..inputs import BadInput, encode_prompt
from .config import PackingConfig, PromptsConfig, SamplingConfig
from .rows import carried, derived_seed
from .task import Task


class GenerateTask(Task):
    name = "generate"
    output_schema = pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("generated_text", pa.string()),
        ("finish_reason", pa.string()), ("num_input_tokens", pa.int64()),
        ("num_truncated_tokens", pa.int64()), ("num_generated_tokens", pa.int64()),
        ("prefill_s", pa.float64()), ("ttft_s", pa.float64()), ("decode_s", pa.float64()),
        ("pack_rows", pa.int64()), ("pack_efficiency", pa.float64()),
        ("error", pa.string()), ("error_kind", pa.string())])
    summary_columns = ("num_generated_tokens",)
    headline = ("model", "output", "rows_in", "rows_out", "rows_reused", "rows_new", "rows_ok", "rows_error", "errors_by_kind",
                "tokens_in", "tokens_out", "wall_s", "tokens_out_per_s", "mean_pack_efficiency", "files_written", "first_file_s")
    job_keys = ("model", "input", "sampling", "prompts")
    sample = "sample_prompts.jsonl"

    def __init__(self, sampling: SamplingConfig, prompts: PromptsConfig):
        self.sampling, self.prompts = sampling, prompts
        # Checked here (the job checks its config earlier): a bad value fails before any work.
        SamplingParams(max_new_tokens=sampling.max_new_tokens, **self.shared_params())

    def shared_params(self) -> dict:
        """SamplingParams fields that every row shares (rows may override max_new_tokens, seed)."""
        s = self.sampling
        return dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, stop=list(s.stop),
                    ignore_eos=s.ignore_eos)

    def prepare(self, row: dict, tokenizer, max_context: int | None) -> dict:
        """Render (chat template for messages), tokenize, apply the length rule.

        The row's max_new_tokens and seed are resolved in place first (error rows keep them too).
        """
        max_new_tokens = row["max_new_tokens"] = row["max_new_tokens"] or self.sampling.max_new_tokens
        row["seed"] = row["seed"] if row["seed"] is not None else derived_seed(self.sampling.seed, row["id"])
        try:
            text = row["prompt"] if row["prompt"] is not None else tokenizer.apply_chat_template(
                row["messages"], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that rejects the roles
            raise BadInput("bad_messages", f"cannot render: {e}") from None
        ids, cut = encode_prompt(tokenizer, text, max_context, max_new_tokens, self.prompts.over_long,
                                 self.prompts.max_prompt_tokens)
        return {"num_input_tokens": len(ids),
                "payload": {"input_ids": ids, "num_truncated_tokens": cut}}

    def runner(self, model, tokenizer, packing: PackingConfig) -> Engine:
        return Engine(model, tokenizer, EngineConfig(
            pack_capacity=packing.pack_capacity, max_group_prompts=packing.max_group_prompts,
            max_group_tokens=packing.max_group_tokens))

    def run(self, engine: Engine, rows: list[dict]) -> list[GenerationResult]:
        params = [SamplingParams(max_new_tokens=r["max_new_tokens"], seed=r["seed"], **self.shared_params())
                  for r in rows]
        return engine.generate_group([r["payload"]["input_ids"] for r in rows], params)

    def output_row(self, row: dict, result: GenerationResult | None = None,
                   error: tuple[str, str] | None = None) -> dict:
        out = carried(row)
        out["prompt"] = row.get("prompt")
        kind, message = error if error else (row.get("error_kind"), row.get("error"))
        r = result if kind is None else None
        payload = row.get("payload") or {}
        out.update(
            id=row["id"], generated_text=r.text if r else None, finish_reason=r.finish_reason if r else None,
            num_input_tokens=row.get("num_input_tokens", 0),
            num_truncated_tokens=payload.get("num_truncated_tokens", 0),
            num_generated_tokens=r.num_generated_tokens if r else 0,
            prefill_s=r.prefill_s if r else None, ttft_s=r.ttft_s if r else None,
            decode_s=r.decode_s if r else None, pack_rows=r.pack_rows if r else None,
            pack_efficiency=r.pack_efficiency if r else None, error=message, error_kind=kind)
        return out

    def summary_extra(self, totals: dict, counts: dict, tokens_in: int, wall_s: float) -> dict:
        out = int(totals.get("num_generated_tokens", 0))
        return {"tokens_out": out, "tokens_out_per_s": round(out / wall_s, 2) if wall_s > 0 else None}

    def __repr__(self) -> str:
        return f"GenerateTask(sampling={asdict(self.sampling)}, prompts={asdict(self.prompts)})"
