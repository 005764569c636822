"""The scoring task: {prompt, choices, answer?} items or lm-eval-style requests in, log-likelihoods out (no Ray).

Two row formats, side by side in one input:
- item: {id, prompt, choices: [str, ...], answer?: int} -> per choice log-likelihood, is_greedy,
  then pred / pred_norm / correct;
- request (lm-eval's `loglikelihood` request): {id, request_type: "loglikelihood", prompt (the
  context), continuation} -> `loglikelihood` and `is_greedy` (also as one-choice lists);
- rolling request (lm-eval's `loglikelihood_rolling`): {id, request_type: "loglikelihood_rolling",
  prompt (the document)} -> `loglikelihood` of the whole document over lm-eval's disjoint
  windows of `scoring.max_length` tokens, `is_greedy` (every token the argmax), and its token
  count in `choice_num_tokens`.
A row that is none of these (or an unknown request_type) is an error row, never dropped.
"""
from __future__ import annotations

import pyarrow as pa

from .. import unpacked
from ..capability import PACKED
from ..inputs import BadInput, ScoreItem, check_item, encode_ids, encode_items, prefix_token
from ..loglik import rolling_doc
from ..scoring import ScoreConfig, Scorer, ScoreResult, prepare
from .config import PackingConfig, ScoringConfig
from .rows import carried
from .task import Task


class ScoreTask(Task):
    name = "score"
    output_schema = pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("choices", pa.list_(pa.string())),
        ("answer", pa.int64()), ("loglikelihood", pa.float64()), ("is_greedy", pa.bool_()),  # request rows
        ("choice_logprobs", pa.list_(pa.float64())),
        ("choice_num_tokens", pa.list_(pa.int64())), ("choice_is_greedy", pa.list_(pa.bool_())),
        ("pred", pa.int64()), ("pred_norm", pa.int64()), ("correct", pa.bool_()), ("correct_norm", pa.bool_()),
        ("num_input_tokens", pa.int64()), ("shared", pa.bool_()), ("prefill_s", pa.float64()),
        ("pack_rows", pa.int64()), ("pack_efficiency", pa.float64()), ("engine_path", pa.string()),
        ("error", pa.string()), ("error_kind", pa.string())])
    summary_columns = ("correct", "correct_norm", "prefill_s", "choice_logprobs")  # the last: pairs
    headline = ("model", "engine_path", "output", "rows_in", "rows_out", "rows_reused", "rows_new", "rows_ok", "rows_error", "errors_by_kind",
                "judged", "accuracy", "accuracy_norm", "tokens_in", "wall_s", "tokens_per_s",
                "prefill_tokens_per_s", "mean_pack_efficiency", "files_written", "first_file_s",
                "pairs", "start_s", "load_s", "busy_s", "actors", "fixed_s", "steady_pairs_per_s")
    job_keys = ("model", "input", "scoring")
    sample = "sample_scoring.jsonl"

    def __init__(self, scoring: ScoringConfig, pack_capacity: int | None = None):
        self.scoring, self.pack_capacity = scoring, pack_capacity  # a pair wider than a row is an error row

    def prepare_rows(self, rows: list[dict], tokenizer, max_context: int | None) -> list[dict]:
        """prepare_row on each row, but every valid item's (prompt, choice) pairs go through one
        tokenizer call (inputs.encode_items, as Scorer.score does); other rows one by one."""
        out: list[dict | None] = [None] * len(rows)
        items: list[tuple[int, ScoreItem]] = []
        for i, r in enumerate(rows):
            if (item := _valid_item(r)) is not None:
                items.append((i, item))
            else:  # documents, error rows: the row's own path says what is wrong
                out[i] = self.prepare_row(r, tokenizer, max_context)
        try:
            encoded = encode_items(tokenizer, [it for _, it in items], max_context, self.pack_capacity)
        except Exception:  # noqa: BLE001 - an unexpected failure: each row meets it alone (prepare_row)
            encoded = [None] * len(items)
        for (i, item), enc in zip(items, encoded):
            if enc is None:
                out[i] = self.prepare_row(rows[i], tokenizer, max_context)
            elif isinstance(enc, BadInput):
                out[i] = dict(rows[i], num_input_tokens=0, payload=None, error=enc.reason, error_kind=enc.kind)
            else:
                out[i] = dict(rows[i], **self.item_fields(item, enc))
        return out  # type: ignore[return-value]

    def prepare(self, row: dict, tokenizer, max_context: int | None) -> dict:
        """Validate an item or a request and tokenize with lm-eval's rule (inputs.encode_items)."""
        if row["prompt"] is None:
            raise BadInput("bad_prompt", "scoring needs a 'prompt' string (chat 'messages' are not scored)")
        item = as_item(row)
        if item is None:  # a loglikelihood_rolling request
            return self.prepare_document(row["prompt"], tokenizer, max_context)
        return self.item_fields(*prepare(tokenizer, item, max_context, self.pack_capacity))

    def item_fields(self, item: ScoreItem, enc) -> dict:
        """A tokenized item's prepared fields (num_input_tokens in the scoring mode's layout)."""
        return {"num_input_tokens": enc.num_tokens(self.scoring.mode == "shared"), "payload": (item, enc)}

    def prepare_document(self, text: str, tokenizer, max_context: int | None) -> dict:
        """A rolling request: the document tokenized as lm-eval's HFLM does, cut into its windows."""
        max_length = self.scoring.max_length or max_context or DEFAULT_MAX_LENGTH
        if max_context is not None and max_length > max_context:
            raise BadInput("too_long", f"scoring.max_length {max_length} > the model's context {max_context}")
        if self.pack_capacity is not None and max_length > self.pack_capacity:
            raise BadInput("too_long", f"rolling windows of {max_length} tokens > pack_capacity {self.pack_capacity}")
        tokens = encode_ids(tokenizer, [text])[0]
        if not tokens:
            raise BadInput("bad_prompt", "the document has no tokens to score")
        doc = rolling_doc(tokens, prefix_token(tokenizer), max_length)
        return {"num_input_tokens": doc.num_tokens(), "payload": (None, doc)}

    def runner(self, model, tokenizer, packing: PackingConfig) -> Scorer:
        return Scorer(model, tokenizer, ScoreConfig(
            mode=self.scoring.mode, pack_capacity=packing.pack_capacity, max_group_tokens=packing.max_group_tokens,
            max_group_prompts=packing.max_group_prompts, length_norm=self.scoring.length_norm))

    def run(self, scorer: Scorer, rows: list[dict]) -> list[ScoreResult]:
        prepared = [r["payload"] for r in rows]
        if scorer.capability.route != PACKED:  # each (prompt, choice) pair alone (capability.py)
            return unpacked.score(scorer, prepared)
        return scorer.score_group(prepared)

    def output_row(self, row: dict, result: ScoreResult | None = None,
                   error: tuple[str, str] | None = None) -> dict:
        out = carried(row)
        choices, answer = out.pop("choices", None), out.pop("answer", None)
        kind, message = error if error else (row.get("error_kind"), row.get("error"))
        r = result if kind is None else None
        ok_choices = isinstance(choices, list) and all(isinstance(c, str) for c in choices)
        ok_answer = isinstance(answer, int) and not isinstance(answer, bool) and -2 ** 63 <= answer < 2 ** 63
        request = "request_type" in out or "continuation" in out
        out.update(
            id=row["id"], prompt=row.get("prompt"), choices=choices if ok_choices else None,
            answer=answer if ok_answer else None,
            loglikelihood=r.choice_logprobs[0] if r and request else None,
            is_greedy=r.choice_is_greedy[0] if r and request else None,
            choice_logprobs=r.choice_logprobs if r else None, choice_num_tokens=r.choice_num_tokens if r else None,
            choice_is_greedy=r.choice_is_greedy if r else None, pred=r.pred if r else None,
            pred_norm=r.pred_norm if r else None, correct=r.correct if r else None,
            correct_norm=r.correct_norm if r else None, num_input_tokens=r.num_tokens if r else 0,
            shared=r.shared if r else None, prefill_s=r.prefill_s if r else None,
            pack_rows=r.pack_rows if r else None, pack_efficiency=r.pack_efficiency if r else None,
            engine_path=r.engine_path if r else None, error=message, error_kind=kind)
        return out

    def summary_extra(self, totals: dict, counts: dict, tokens_in: int, wall_s: float) -> dict:
        n, prefill_s = counts.get("correct", 0), totals.get("prefill_s", 0.0)
        return {"judged": n,
                "accuracy": round(totals["correct"] / n, 6) if n else None,
                "accuracy_norm": round(totals["correct_norm"] / n, 6) if n else None,
                "prefill_s": round(prefill_s, 4),
                "tokens_per_s": round(tokens_in / wall_s, 2) if wall_s > 0 else None,
                "prefill_tokens_per_s": round(tokens_in / prefill_s, 2) if prefill_s > 0 else None}


ROLLING = "loglikelihood_rolling"
REQUEST_TYPES = ("loglikelihood", ROLLING)
DEFAULT_MAX_LENGTH = 2048  # lm-eval HFLM's max_length when neither the config nor the tokenizer says


def _valid_item(row: dict) -> ScoreItem | None:
    """A row's checked ScoreItem (an item or a loglikelihood request), or None when it is
    anything else: an error row, a rolling request, an invalid row."""
    if row["error"] is not None or row["prompt"] is None:
        return None
    try:
        item = as_item(row)
        return None if item is None else check_item(item)
    except Exception:  # noqa: BLE001 - BadInput or worse: prepare_row makes the row's error
        return None


def as_item(row: dict) -> dict | None:
    """A parsed row as an item: loglikelihood requests become one-choice items with no
    answer; None for a valid loglikelihood_rolling request (a whole document). BadInput
    (bad_request) for a request row that is neither."""
    carry = carried(row)
    if "request_type" not in carry and "continuation" not in carry:
        return {"prompt": row["prompt"], "choices": carry.get("choices"), "answer": carry.get("answer")}
    if "choices" in carry:
        raise BadInput("bad_request", "a row has 'choices' (an item) or 'request_type'/'continuation' (a request), "
                                      "not both")
    kind = carry.get("request_type", "loglikelihood")
    if kind not in REQUEST_TYPES:
        raise BadInput("bad_request", f"request_type {kind!r} is not scored here (one of {REQUEST_TYPES})")
    if kind == ROLLING:
        if "continuation" in carry:
            raise BadInput("bad_request", "a loglikelihood_rolling row scores its whole 'prompt'; "
                                          "it takes no 'continuation'")
        return None
    cont = carry.get("continuation")
    if not isinstance(cont, str) or not cont:
        raise BadInput("bad_request", f"'continuation' must be a non-empty string, got {cont!r}")
    return {"prompt": row["prompt"], "choices": [cont]}
