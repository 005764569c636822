"""The generation task: prompts (or chat messages) in, completions with timings out (no Ray)."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import pyarrow as pa

from ..core.sampling import SamplingParams
from ..engine import Engine, EngineConfig
from ..inputs import BadInput, encode_prompt
from ..outputs import Completion, GenerationResult
from .config import PackingConfig, PromptsConfig, SamplingConfig
from .rows import carried, derived_seed
from .task import Task


LOGPROB = pa.struct([("token_id", pa.int64()), ("logprob", pa.float64()), ("rank", pa.int64())])
LOGPROBS = pa.list_(pa.list_(LOGPROB))  # per generated token: the chosen token first, then the top k
COMPLETION = pa.struct([  # one of n completions: the same names as the row's own columns
    ("generated_text", pa.string()), ("generated_tokens", pa.list_(pa.int64())),
    ("num_generated_tokens", pa.int64()), ("finish_reason", pa.string()), ("stop_reason", pa.string()),
    ("stop_token_id", pa.int64()), ("logprobs", LOGPROBS)])


class GenerateTask(Task):
    name = "generate"
    output_schema = pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("generated_text", pa.string()),
        ("generated_tokens", pa.list_(pa.int64())), ("finish_reason", pa.string()),
        ("stop_reason", pa.string()), ("stop_token_id", pa.int64()), ("num_input_tokens", pa.int64()),
        ("num_truncated_tokens", pa.int64()), ("num_generated_tokens", pa.int64()),
        ("logprobs", LOGPROBS), ("outputs", pa.list_(COMPLETION)), ("sampling_params", pa.string()),
        ("prefill_s", pa.float64()), ("queue_s", pa.float64()), ("ttft_s", pa.float64()), ("decode_s", pa.float64()),
        ("pack_rows", pa.int64()), ("pack_efficiency", pa.float64()), ("engine_path", pa.string()),
        ("error", pa.string()), ("error_kind", pa.string())])
    summary_columns = ("num_generated_tokens",)
    headline = ("model", "engine_path", "output", "rows_in", "rows_out", "rows_reused", "rows_new", "rows_ok", "rows_error", "errors_by_kind",
                "tokens_in", "tokens_out", "wall_s", "tokens_out_per_s", "mean_pack_efficiency", "files_written", "first_file_s")
    job_keys = ("model", "input", "sampling", "prompts")
    sample = "sample_prompts.jsonl"

    def __init__(self, sampling: SamplingConfig, prompts: PromptsConfig):
        self.sampling, self.prompts = sampling, prompts
        # Checked here too (the job checks its config earlier): a bad value fails before any work.
        self.defaults = sampling.params()

    def row_params(self, row: dict) -> SamplingParams:
        """The job's sampling settings with the row's own (`sampling_params`, top-level
        max_new_tokens / seed) over them; a row without a seed gets one derived from its id."""
        overrides = row.get("sampling_params") or {}
        try:
            params = self.defaults.with_overrides(overrides)
        except ValueError as e:
            raise BadInput("bad_field", f"sampling_params.{e}") from None
        return params if params.seed is not None else replace(params, seed=derived_seed(self.sampling.seed, row["id"]))

    def prepare(self, row: dict, tokenizer, max_context: int | None) -> dict:
        """Resolve the row's sampling settings, render (chat template for messages), tokenize,
        apply the length rule. The resolved max_new_tokens and seed and the rendered prompt
        are set in place (an error row keeps what was resolved before the error)."""
        params = self.row_params(row)
        row["max_new_tokens"], row["seed"] = params.max_new_tokens, params.seed
        try:
            text = row["prompt"] if row["prompt"] is not None else tokenizer.apply_chat_template(
                row["messages"], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that rejects the roles
            raise BadInput("bad_messages", f"cannot render: {e}") from None
        row["prompt"] = text  # the text the model sees (ray.data.llm's `prompt`)
        ids, cut = encode_prompt(tokenizer, text, max_context, params.max_new_tokens, self.prompts.over_long,
                                 self.prompts.max_prompt_tokens)
        return {"num_input_tokens": len(ids),
                "payload": {"input_ids": ids, "num_truncated_tokens": cut, "sampling": params}}

    def runner(self, model, tokenizer, packing: PackingConfig) -> Engine:
        return Engine(model, tokenizer, EngineConfig(
            pack_capacity=packing.pack_capacity, max_group_prompts=packing.max_group_prompts,
            max_group_tokens=packing.max_group_tokens, max_num_seqs=packing.max_num_seqs))

    def run(self, engine: Engine, rows: list[dict]) -> list[GenerationResult]:
        return engine.generate_ids([r["payload"]["input_ids"] for r in rows],
                                   [r["payload"]["sampling"] for r in rows])

    def output_row(self, row: dict, result: GenerationResult | None = None,
                   error: tuple[str, str] | None = None) -> dict:
        out = carried(row)
        out["prompt"] = row.get("prompt")
        kind, message = error if error else (row.get("error_kind"), row.get("error"))
        r = result if kind is None else None
        payload = row.get("payload") or {}
        first = completion_columns(r.outputs[0]) if r else dict.fromkeys(COMPLETION.names)
        overrides = row.get("sampling_params")
        out.update(first)
        out.update(
            id=row["id"], num_input_tokens=row.get("num_input_tokens", 0),
            num_truncated_tokens=payload.get("num_truncated_tokens", 0),
            num_generated_tokens=r.num_generated_tokens if r else 0,
            outputs=[completion_columns(c) for c in r.outputs] if r and len(r.outputs) > 1 else None,
            sampling_params=json.dumps(overrides, default=str) if overrides else None,
            prefill_s=r.prefill_s if r else None, queue_s=r.queue_s if r else None, ttft_s=r.ttft_s if r else None,
            decode_s=r.decode_s if r else None, pack_rows=r.pack_rows if r else None,
            pack_efficiency=r.pack_efficiency if r else None, engine_path=r.engine_path if r else None,
            error=message, error_kind=kind)
        return out

    def summary_extra(self, totals: dict, counts: dict, tokens_in: int, wall_s: float) -> dict:
        out = int(totals.get("num_generated_tokens", 0))
        return {"tokens_out": out, "tokens_out_per_s": round(out / wall_s, 2) if wall_s > 0 else None}

    def __repr__(self) -> str:
        return f"GenerateTask(sampling={asdict(self.sampling)}, prompts={asdict(self.prompts)})"


def completion_columns(c: Completion) -> dict:
    """A completion as output columns (COMPLETION's fields). vLLM's stop_reason (str | int)
    is split in two, one Arrow type per column: stop_reason (string), stop_token_id (int)."""
    return {"generated_text": c.text, "generated_tokens": c.token_ids, "num_generated_tokens": len(c.token_ids),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason if isinstance(c.stop_reason, str) else None,
            "stop_token_id": c.stop_reason if isinstance(c.stop_reason, int) else None,
            "logprobs": None if c.logprobs is None else [
                [{"token_id": t, "logprob": lp.logprob, "rank": lp.rank} for t, lp in step.items()]
                for step in c.logprobs]}
