"""Compiled decoder layers (core/compile.py): each prompt's numbers as when it runs alone in
plain Hugging Face, the compile scoped to the engine's calls, and an eager fallback with a
warning when compiling fails."""
import random
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from prepack_actor.core.compile import compile_refusal, decoder_layers
from prepack_actor.core.params import SamplingParams
from prepack_actor.engine import Engine, EngineConfig
from prepack_actor.models import load_model
from prepack_actor.scoring import ScoreConfig, Scorer

from test_architectures import CASES, NEW_TOKENS, VOCAB, TokenIds, alone, build
from test_scoring import ITEMS

pytestmark = pytest.mark.slow  # inductor compiles C++ for each model (~10-30 s each here)

# Gated MLP + RMSNorm + GQA; a sliding window; eager attention with soft-capping (dense-mask
# prefill, left-padded decode); LayerNorm with a plain MLP and learned positions.
COMPILED = [("llama", "sdpa"), ("mistral-sw8", "sdpa"), ("gemma2-sw8", "eager"), ("gpt2", "sdpa")]


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 60, 17, 29, 40, 9)]


@pytest.mark.parametrize("name,attn", COMPILED)
def test_compiled_engine_matches_each_prompt_alone(name, attn):
    torch.set_num_threads(1)
    _, model_type, overrides, _ = next(c for c in CASES if c[0] == name)
    model = build(model_type, overrides, attn)
    assert compile_refusal(model) is None and decoder_layers(model)
    ps = prompts(len(name))
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a compile failure warns: it must not happen here
        engine = Engine(model, TokenIds(), EngineConfig(pack_capacity=64, compile=True))
        assert engine.compile
        logits = engine.prefill(ps)
        results = engine.generate(ps, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert counters["stats"]["unique_graphs"] > 0  # inductor really compiled the layers
    assert all(m._compiled_call_impl is None for m in decoder_layers(model))  # scoped to the engine's calls
    for i, p in enumerate(ps):
        ref_logits, ref_tokens = alone(model, p)
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-4, rtol=0, msg=f"prompt {i} (len {len(p)})")
        assert results[i].token_ids == ref_tokens, f"prompt {i}"


def test_compiled_scorer_equals_eager_scorer(tiny_model_dir):
    torch.set_num_threads(1)
    model, tokenizer = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    counters.clear()
    scorer = Scorer(model, tokenizer, ScoreConfig(compile=True))
    scorer.warm_up()  # what the scoring job's actor does at start-up
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    fast = scorer.score(ITEMS)
    plain = Scorer(model, tokenizer, ScoreConfig()).score(ITEMS)
    for f, p in zip(fast, plain):
        torch.testing.assert_close(torch.tensor(f.choice_logprobs), torch.tensor(p.choice_logprobs), atol=1e-4, rtol=0)
        assert f.choice_is_greedy == p.choice_is_greedy and f.pred == p.pred


def test_compile_failure_warns_once_and_runs_eager():
    torch.set_num_threads(1)
    model = build("qwen3", {}, "sdpa")  # a class no other test compiles: nothing cached to reuse
    ps = prompts(3)
    want = Engine(model, TokenIds(), EngineConfig(pack_capacity=64)).prefill(ps)
    engine = Engine(model, TokenIds(), EngineConfig(pack_capacity=64, compile=True))
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}), \
            pytest.warns(UserWarning, match="torch.compile failed, running eager") as caught:
        got = engine.prefill(ps)
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert "compiling failed earlier" in compile_refusal(model)
    again = Engine(model, TokenIds(), EngineConfig(pack_capacity=64, compile=True))
    assert not again.compile  # the model stays eager


def test_job_actor_with_model_compile_equals_the_eager_engine(tiny_model_dir):
    """model.compile: true in a job: the actor's runner compiles (in the EngineLoop's thread)
    and every row equals the eager engine."""
    from job_helpers import PROMPTS
    from prepack_actor.job.config import ModelConfig, PackingConfig, ProcessorConfig, SamplingConfig
    from prepack_actor.job.actor import PrepackActor
    from prepack_actor.job.rows import validate_record
    from prepack_actor.models import load_tokenizer

    torch.set_num_threads(1)
    path = tiny_model_dir("llama")
    model, tok = load_model(path, dtype="float32", device="cpu")
    want = Engine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=6, ignore_eos=True))
    counters.clear()
    actor = PrepackActor(ProcessorConfig(task="generate", model=ModelConfig(path=path, device="cpu", compile=True),
                                         packing=PackingConfig(max_group_prompts=64),
                                         sampling=SamplingConfig(max_new_tokens=6, ignore_eos=True)))
    assert actor.runner.compile
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # compiled at start-up (warm_up), inside the actor's load_s
    tokenizer, ctx = load_tokenizer(path)
    rows = [actor.task.prepare_row(validate_record({"prompt": p}, f"d:{i}", f"line {i}"), tokenizer, ctx)
            for i, p in enumerate(PROMPTS)]
    out = {r["id"]: r for r in actor.run_group(rows)}
    assert counters["stats"]["unique_graphs"] == graphs  # the group's own shapes compiled nothing new
    for i, w in enumerate(want):
        assert out[f"d:{i}"]["generated_tokens"] == w.token_ids and out[f"d:{i}"]["error"] is None


def test_lm_eval_backend_takes_compile_from_model_args(tiny_model_dir):
    from prepack_actor.lmeval import PrepackLM

    assert PrepackLM(pretrained=tiny_model_dir("llama"), compile="true").scorer.compile
    assert not PrepackLM(pretrained=tiny_model_dir("llama")).scorer.compile
