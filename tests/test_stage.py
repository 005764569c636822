"""The Ray Data stage inside a user's own pipeline: an in-memory Dataset, a filter, the stage,
a postprocess function; each row once, the same numbers as the library."""
import json
from importlib import resources

import pytest
import ray

from prepack_actor import Engine, SamplingParams, load_model, score
from prepack_actor.job import (ActorsConfig, ModelConfig, PackingConfig, ProcessorConfig, SamplingConfig,
                               ScoringConfig, build_processor)

pytestmark = pytest.mark.slow  # a real (local) Ray

QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?",
             "Explain gravity in one sentence.", "List three colours.", "What is 2 + 2?",
             "Who wrote Hamlet?", "Describe a cat.", "Translate 'hello' into Spanish."]


def test_generate_stage_in_a_user_pipeline(tiny_model_dir, ray_local):
    path = tiny_model_dir("llama")
    items = [{"qid": i, "question": q, "source": "quiz"} for i, q in enumerate(QUESTIONS)]
    items.append({"qid": 100, "question": "", "source": "quiz"})  # an empty prompt: an error row, not a crash
    ds = ray.data.from_items(items).filter(lambda r: r["qid"] % 3 != 0)  # the user's own step
    processor = build_processor(
        ProcessorConfig(task="generate", model=ModelConfig(path=path, dtype="float32"),
                        sampling=SamplingConfig(max_new_tokens=5),
                        packing=PackingConfig(max_group_tokens=48, max_group_prompts=3),
                        actors=ActorsConfig(concurrency=(1, 1))),
        preprocess=lambda r: {"id": f"q{r['qid']}", "prompt": r["question"], "qid": r["qid"], "source": r["source"]},
        postprocess=lambda r: {"qid": r["qid"], "answer": r["generated_text"], "error_kind": r["error_kind"],
                               "source": r["source"], "tokens": r["num_generated_tokens"]})
    out = sorted(processor(ds).take_all(), key=lambda r: r["qid"])

    kept = [i for i in range(len(QUESTIONS)) if i % 3] + [100]
    assert [r["qid"] for r in out] == kept  # each row exactly once, carried column intact
    assert all(r["source"] == "quiz" for r in out) and set(out[0]) == {"qid", "answer", "error_kind", "source",
                                                                       "tokens"}
    assert out[-1]["error_kind"] == "empty_prompt" and out[-1]["answer"] is None
    model, tok = load_model(path, dtype="float32", device="cpu")
    ref = Engine(model, tok).generate([QUESTIONS[i] for i in kept[:-1]], SamplingParams(max_new_tokens=5))
    for r, e in zip(out, ref):
        assert r["error_kind"] is None and r["answer"] == e.text and r["tokens"] == e.num_generated_tokens


def test_score_stage_in_a_user_pipeline(tiny_model_dir, ray_local):
    path = tiny_model_dir("llama")
    sample = resources.files("prepack_actor") / "data" / "sample_scoring.jsonl"
    items = [json.loads(line) for line in sample.read_text().splitlines()][:10]
    ds = ray.data.from_items([dict(it, subject=it["prompt"].split(" about ")[1].split(".")[0]) for it in items])
    ds = ds.filter(lambda r: r["answer"] != 0)  # the user's own step
    processor = build_processor(
        ProcessorConfig(task="score", model=ModelConfig(path=path, dtype="float32"),
                        scoring=ScoringConfig(mode="shared"), packing=PackingConfig(max_group_tokens=900)),
        postprocess=lambda r: {"id": r["id"], "pred": r["pred"], "logprobs": r["choice_logprobs"],
                               "correct": r["correct"], "subject": r["subject"]})
    out = {r["id"]: r for r in processor(ds).take_all()}

    kept = [it for it in items if it["answer"] != 0]
    assert sorted(out) == sorted(it["id"] for it in kept) and len(out) == len(kept)
    model, tok = load_model(path, dtype="float32", device="cpu")
    for it, exp in zip(kept, score(model, tok, kept, mode="simple")):  # the library, the other layout
        row = out[it["id"]]
        assert row["pred"] == exp.pred and row["correct"] == exp.correct and row["subject"]
        assert max(abs(a - b) for a, b in zip(row["logprobs"], exp.choice_logprobs)) < 1e-4
