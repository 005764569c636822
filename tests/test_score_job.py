"""Scoring job: rows -> groups -> PrepackActor (score task) -> output rows -> summary; the Ray Data job."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from prepack_actor.job.actor import PrepackActor
from prepack_actor.job.config import (ConfigError, ModelConfig, PackingConfig, ProcessorConfig, ScoreJobConfig,
                                      ScoringConfig)
from prepack_actor.job.config_file import load_config
from prepack_actor.job.rows import make_groups, parse_jsonl_shard, unpack_group
from prepack_actor.job.score import ScoreTask
from prepack_actor.job.storage import read_output
from prepack_actor.job.summary import SummaryAccumulator
from prepack_actor.models import load_model
from prepack_actor.scoring import ScoreResult, decide, score

ROLLING_MAX = 16  # scoring.max_length in these runs: the longer document spans several windows
TASK = ScoreTask(ScoringConfig(mode="shared", max_length=ROLLING_MAX))
output_row, to_table = TASK.output_row, TASK.to_table


def group_rows(rows, tok, max_context, max_group_tokens, max_group_prompts):
    return make_groups(TASK.prepare_rows(rows, tok, max_context), max_group_tokens, max_group_prompts)

ROOT = Path(__file__).resolve().parent.parent
GOOD = [json.loads(line) for line in (ROOT / "prepack_actor/data/sample_scoring.jsonl").read_text().splitlines()][:8]
BAD = [  # (line, expected error_kind)
    (json.dumps({"id": "no-choices", "prompt": "Q?", "choices": []}), "bad_choices"),
    (json.dumps({"id": "missing-choices", "prompt": "Q?"}), "bad_choices"),
    (json.dumps({"id": "str-choices", "prompt": "Q?", "choices": " A B"}), "bad_choices"),
    (json.dumps({"id": "int-choice", "prompt": "Q?", "choices": [" A", 2]}), "bad_choices"),
    (json.dumps({"id": "answer-range", "prompt": "Q?", "choices": [" A", " B"], "answer": 2}), "bad_answer"),
    (json.dumps({"id": "answer-str", "prompt": "Q?", "choices": [" A", " B"], "answer": "A"}), "bad_answer"),
    (json.dumps({"id": "empty-prompt", "prompt": "", "choices": [" A"]}), "empty_prompt"),
    (json.dumps({"id": "no-prompt", "choices": [" A"]}), "missing_prompt"),
    ('{"id": "broken", "prompt": ', "invalid_json"),
]
UNJUDGED = {"id": "no-answer", "prompt": "The sky is", "choices": [" blue", " green"], "extra": 7}
REQUEST = {"id": "request", "request_type": "loglikelihood", "prompt": "The sky is", "continuation": " green"}
ROLLING = [  # lm-eval loglikelihood_rolling requests: the prompt is the whole document
    {"id": "doc-long", "request_type": "loglikelihood_rolling",
     "prompt": "The quick brown fox jumps over the lazy dog. " * 6 + "Then it naps in the sun until evening."},
    {"id": "doc-short", "request_type": "loglikelihood_rolling", "prompt": "Hello world"},
]
BAD_REQUESTS = [  # (row, expected error_kind): lm-eval-style rows that cannot be scored
    ({"id": "req-rolling-cont", "request_type": "loglikelihood_rolling", "prompt": "x", "continuation": " y"},
     "bad_request"),
    ({"id": "req-generate", "request_type": "generate_until", "prompt": "x", "continuation": " y"}, "bad_request"),
    ({"id": "req-empty", "request_type": "loglikelihood", "prompt": "x", "continuation": ""}, "bad_request"),
    ({"id": "req-both", "request_type": "loglikelihood", "prompt": "x", "continuation": " y", "choices": [" y"]},
     "bad_request"),
]


def write_input(path: Path) -> Path:
    lines = [json.dumps(r) for r in GOOD[:4]] + [b for b, _ in BAD] + [json.dumps(UNJUDGED)] + \
            [json.dumps(r) for r in GOOD[4:]] + [json.dumps(REQUEST)] + [json.dumps(r) for r in ROLLING] + \
            [json.dumps(r) for r, _ in BAD_REQUESTS]
    path.write_text("\n".join(lines) + "\n")
    return path


def check_rows(rows: list[dict], model, tok) -> None:
    """Behaviour shared by the direct and the Ray Data runs."""
    n_in = len(GOOD) + len(BAD) + 2 + len(ROLLING) + len(BAD_REQUESTS)
    assert len(rows) == n_in and len({r["id"] for r in rows}) == n_in  # rows in = rows out
    by_id = {r["id"]: r for r in rows}
    for line, kind in BAD:
        row = by_id.get(json.loads(line)["id"]) if kind != "invalid_json" else \
            next(r for r in rows if r["error_kind"] == "invalid_json")
        assert row["error_kind"] == kind and row["error"], (line, row)
        assert row["choice_logprobs"] is None and row["pred"] is None and row["correct"] is None
    expected = score(model, tok, GOOD + [UNJUDGED], mode="simple")  # the library, other layout
    for item, exp in zip(GOOD + [UNJUDGED], expected):
        row = by_id[item["id"]]
        assert row["error"] is None and row["shared"] is True
        assert max(abs(a - b) for a, b in zip(row["choice_logprobs"], exp.choice_logprobs)) < 1e-4
        assert (row["pred"], row["pred_norm"], row["choice_num_tokens"]) == (exp.pred, exp.pred_norm,
                                                                             exp.choice_num_tokens)
        assert row["correct"] == (None if "answer" not in item else row["pred"] == item["answer"])
        assert row["choices"] == item["choices"] and row["prefill_s"] > 0 and 0 < row["pack_efficiency"] <= 1
    assert by_id["no-answer"]["extra"] == 7  # carried input columns come back
    req = by_id["request"]  # the lm-eval-style request: the same pair as no-answer's second choice
    assert req["error"] is None and req["continuation"] == " green" and req["correct"] is None
    assert abs(req["loglikelihood"] - by_id["no-answer"]["choice_logprobs"][1]) < 1e-4
    assert req["is_greedy"] == by_id["no-answer"]["choice_is_greedy"][1]
    for row, kind in BAD_REQUESTS:
        assert by_id[row["id"]]["error_kind"] == kind and by_id[row["id"]]["loglikelihood"] is None
    check_rolling(by_id, model, tok)


def check_rolling(by_id: dict, model, tok) -> None:
    """Rolling rows equal lm-eval HFLM's loglikelihood_rolling at the same max_length."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, logits_cache=False)
    hf._max_length = ROLLING_MAX
    expected = hf.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (r["prompt"],), 0) for r in ROLLING],
                                        disable_tqdm=True)
    for r, exp in zip(ROLLING, expected):
        row = by_id[r["id"]]
        assert row["error"] is None and row["request_type"] == "loglikelihood_rolling" and row["pred"] is None
        assert abs(row["loglikelihood"] - exp) < 1e-4 * max(1.0, abs(exp) / 10), (r["id"], row["loglikelihood"], exp)
        assert row["choice_num_tokens"] == [len(hf.tok_encode(r["prompt"]))]
    assert by_id["doc-long"]["choice_num_tokens"][0] > 2 * ROLLING_MAX  # several windows


def test_actor_scores_groups_and_passes_error_rows(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    model, tok = load_model(path, dtype="float32", device="cpu")
    rows = parse_jsonl_shard(write_input(tmp_path / "in.jsonl").read_bytes(), "in.jsonl")
    groups = group_rows(rows, tok, 2048, max_group_tokens=600, max_group_prompts=64)
    assert len(groups["rows"]) >= 3  # the budget cuts the good rows into several groups
    actor = PrepackActor(ProcessorConfig(task="score", model=ModelConfig(
        path=path, cache_dir=str(tmp_path), dtype="float32", device="cpu"),
        packing=PackingConfig(max_group_tokens=600), scoring=ScoringConfig(mode="shared", max_length=ROLLING_MAX)))
    out = [r for blob in groups["rows"] for r in actor.run_group(unpack_group(blob))]
    check_rows(to_table(out).to_pylist(), model, tok)


def test_prepare_rows_tokenizes_items_in_one_call_as_row_by_row(tiny_model_dir, tmp_path):
    _, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    rows = parse_jsonl_shard(write_input(tmp_path / "in.jsonl").read_bytes(), "in.jsonl")
    rows.append(dict(rows[0], id="too-long", prompt="word " * 3000))  # an item error found while tokenizing
    alone = [TASK.prepare_row(r, tok, 2048) for r in rows]
    calls = [0]
    plain = type(tok).__call__

    def counting(self, *a, **kw):
        calls[0] += 1
        return plain(self, *a, **kw)

    type(tok).__call__ = counting
    try:
        batched = TASK.prepare_rows(rows, tok, 2048)
    finally:
        type(tok).__call__ = plain
    assert batched == alone  # same rows, payloads (ScoreItem, EncodedItem / RollingDoc) and errors, in order
    items = [r for r in alone if r["payload"] is not None and r["payload"][0] is not None]
    assert len(items) >= 10 and [r["error_kind"] for r in alone].count("too_long") == 1
    assert calls[0] <= 2 + len(ROLLING)  # the items' pairs in one batched encode; each document its own


def test_summary_accuracy_equals_rows_and_rigged_scores_give_100_percent():
    items = [{"choices": [" A", " B", " C"], "answer": a} for a in (0, 1, 2, 1)]
    rows = []
    for it in items:  # hand-made scores that favour the answer, through the same aggregation
        lps = [-1.0 if j == it["answer"] else -9.0 for j in range(3)]
        res = ScoreResult(choice_logprobs=lps, choice_num_tokens=[1] * 3, choice_is_greedy=[False] * 3,
                          **decide(lps, [1] * 3, it["choices"], it["answer"]), num_tokens=10, prefill_s=0.5,
                          pack_rows=1, pack_efficiency=0.9)
        rows.append(output_row({"id": str(len(rows)), "carry": None}, res))
    rows.append(output_row({"id": "bad", "error": "empty prompt", "error_kind": "empty_prompt"}))
    acc = SummaryAccumulator(TASK.summary_columns)
    acc.add(to_table(rows).to_pydict())
    s = acc.finish(TASK, rows_in=5, wall_s=2.0)
    assert (s["accuracy"], s["accuracy_norm"], s["judged"], s["rows_error"]) == (1.0, 1.0, 4, 1)
    assert s["tokens_in"] == 40 and s["prefill_tokens_per_s"] == 20.0 and "tokens_out" not in s


def test_config_rejects_bad_scoring_keys():
    cfg = load_config(ScoreJobConfig, ["scoring.mode=simple"], ROOT / "conf" / "score.yaml")
    assert cfg.scoring.mode == "simple" and cfg.output.path == "outputs/score"
    with pytest.raises(ConfigError, match="scoring.mode"):
        load_config(ScoreJobConfig, ["scoring.mode=tree"], ROOT / "conf" / "score.yaml")
    with pytest.raises(ConfigError, match="scoring.max_length"):
        load_config(ScoreJobConfig, ["scoring.max_length=0"], ROOT / "conf" / "score.yaml")
    with pytest.raises(ConfigError, match="nope"):
        load_config(ScoreJobConfig, ["scoring.nope=1"], ROOT / "conf" / "score.yaml")


@pytest.mark.slow
def test_job_through_ray_data(tiny_model_dir, tmp_path, ray_local):
    """One CPU actor: with 2 CPUs, two actors would leave none for the read/group tasks."""
    spec = importlib.util.spec_from_file_location("score_job", ROOT / "jobs" / "score.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    path = tiny_model_dir("llama")
    model, tok = load_model(path, dtype="float32", device="cpu")
    out = tmp_path / "out"
    summary = job.main([f"model.path={path}", f"input.path={write_input(tmp_path / 'in.jsonl')}",
                        f"output.path={out}", "output.format=jsonl", "model.dtype=float32",
                        "packing.max_group_tokens=700", f"scoring.max_length={ROLLING_MAX}"])  # ray_local: 2-CPU Ray
    rows = [r for t in read_output(str(out), "jsonl") for r in t.to_pylist()]
    check_rows(rows, model, tok)
    judged = [r for r in rows if r["correct"] is not None]
    assert summary["rows_in"] == summary["rows_out"] == len(rows)
    assert summary["judged"] == len(judged) == len(GOOD)
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in judged) / len(judged))
    assert summary["accuracy_norm"] == pytest.approx(sum(r["correct_norm"] for r in judged) / len(judged))
    assert summary["errors_by_kind"]["bad_choices"] == 4
    assert summary["pairs"] == sum(len(r["choice_logprobs"]) for r in rows if r["error"] is None)
    assert summary["actors"] == 1 and summary["busy_s"] > 0 and summary["load_s"] > 0
    assert 0 < summary["fixed_s"] <= summary["start_s"] + summary["wall_s"]
    assert summary["steady_pairs_per_s"] > summary["pairs"] / (summary["start_s"] + summary["wall_s"])
    assert json.loads((out / "_summary.json").read_text())["accuracy"] == summary["accuracy"]


def test_cost_separates_fixed_cost_from_throughput():
    import pyarrow as pa
    from prepack_actor.job.pipeline import Cost
    cost = Cost(start_s=5.0)
    for actor, load, busy, malloc in (("a", 2.0, 1.0, "tcmalloc"), ("b", 3.0, 1.0, "system"), ("a", 0.0, 2.0, "tcmalloc"),
                                      ("b", 0.0, 2.0, "system")):
        cost.add(pa.table({"actor": [actor], "load_s": [load], "busy_s": [busy], "allocator": [malloc]}))
    s = cost.summary(wall_s=10.0, pairs=300)
    assert (s["actors"], s["load_s"], s["busy_s"]) == (2, 3.0, 6.0)
    assert s["allocators"] == ["system", "tcmalloc"]  # a mixed cluster shows both
    assert s["fixed_s"] == 12.0  # 5 + 10 - 6 / 2: the rest of the run is the actors' work
    assert s["steady_pairs_per_s"] == 100.0 and s["pairs"] == 300
    assert "pairs" not in cost.summary(wall_s=10.0)  # generation: no pairs
