"""Concurrent calls on one running batch (engine_loop.py) equal each call alone; a failure
reaches every call in flight and the job's actor reruns its own rows alone, so only the bad
row is marked."""
import threading
import time

import pytest
import torch

from prepack_actor import Engine, EngineConfig, SamplingParams, build_tiny_model, load_model
from prepack_actor.engine_loop import EngineLoop
from prepack_actor.job.actor import PrepackActor
from prepack_actor.job.config import ActorsConfig, ModelConfig, PackingConfig, ProcessorConfig, PromptsConfig, SamplingConfig
from prepack_actor.job.generate import GenerateTask
from prepack_actor.models import load_tokenizer
from test_engine import hf_alone_greedy, random_prompts

CALLS = [[5, 31, 1], [12, 20], [3, 9, 17, 26], [8]]  # prompt lengths per call
NEW = [[64, 1, 7], [33, 2], [50, 16, 64, 3], [20]]  # max_new_tokens 1..64


def concurrently(fn, args: list) -> list:
    """fn(*a) for each a in its own thread, started a little apart; results in order."""
    out: list = [None] * len(args)

    def go(i):
        time.sleep(0.02 * i)
        out[i] = fn(*args[i])
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")


def test_concurrent_calls_share_the_batch_and_equal_each_prompt_alone(model_and_tok):
    model, tok = model_and_tok
    torch.set_num_threads(1)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4))
    loop = EngineLoop(engine)
    assert loop.shared
    prompts = [random_prompts(model.config.vocab_size, lengths, seed) for seed, lengths in enumerate(CALLS)]
    greedy = [[SamplingParams(max_new_tokens=m) for m in ms] for ms in NEW]
    sampled = [[SamplingParams(max_new_tokens=m, temperature=0.9, top_p=0.9, seed=10 * c + i, n=1 + i % 2)
                for i, m in enumerate(ms)] for c, ms in enumerate(NEW)]
    sizes, calls = [], []  # per turn: running sequences, and the calls they belong to
    advance = engine.advance

    def spy(run, ids):
        sizes.append(run.batch.size)
        calls.append(len({id(c) for c in loop.calls for s in run.batch.seqs if s.prompt in c.prompts}))
        advance(run, ids)
    engine.advance = spy
    got = concurrently(loop.generate_ids, list(zip(prompts, greedy)))
    got_sampled = concurrently(loop.generate_ids, list(zip(prompts, sampled)))
    del engine.advance
    assert max(sizes) == 4 and max(calls) >= 2  # max_num_seqs held; calls shared the running batch
    for ids, ms, results in zip(prompts, NEW, got):
        for p, m, r in zip(ids, ms, results):
            assert r.token_ids == hf_alone_greedy(model, p, m) and r.num_generated_tokens == m
            assert 0 <= r.queue_s < r.ttft_s and r.prefill_s > 0
    for ids, params, results in zip(prompts, sampled, got_sampled):  # seeded: as the call alone
        alone = engine.generate_ids(ids, params)
        assert [[o.token_ids for o in r.outputs] for r in results] == [[o.token_ids for o in r.outputs] for r in alone]
    assert loop.run is None and not loop.ids and not loop.calls  # nothing kept once idle


def test_a_failure_reaches_every_call_in_flight_and_the_loop_goes_on(model_and_tok):
    model, tok = model_and_tok
    loop = EngineLoop(Engine(model, tok, EngineConfig(max_num_seqs=8)))
    vocab = model.config.vocab_size
    good = random_prompts(vocab, [6, 9], 3)
    bad = [[5, 6, vocab + 7]]  # a token id past the embedding: the packed prefill raises
    params = [SamplingParams(max_new_tokens=4)] * 2
    futures = [loop.submit(good, params, 0.0), loop.submit(bad, params[:1], 0.0)]
    for f in futures:
        with pytest.raises(IndexError):
            f.result(timeout=60)
    again = loop.generate_ids(good, params)  # the loop still serves
    assert [r.token_ids for r in again] == [hf_alone_greedy(model, p, 4) for p in good]


def test_actor_runs_groups_at_once_and_marks_only_the_bad_row(tmp_path):
    """Three groups on one actor, in threads as Ray Data runs them (max_concurrent_batches):
    the group holding a prompt the model fails on fails the shared batch; every group reruns
    alone and only that row becomes an engine_error."""
    path = str(build_tiny_model("gpt2", tmp_path / "gpt2", max_positions=32))  # a 40-token prompt fails in it
    tok, ctx = load_tokenizer(path)
    task = GenerateTask(SamplingConfig(max_new_tokens=5), PromptsConfig(max_prompt_tokens=100))
    texts = [["Hello there", "The sea is"], ["What is the capital of France?", " ".join(["sea"] * 40)],
             ["Explain", "Once upon a time"]]
    groups = [[task.prepare_row({"id": f"g{g}r{i}", "prompt": t, "messages": None, "max_new_tokens": None, "seed": None,
                                 "error": None, "error_kind": None, "carry": {}}, tok, ctx)
               for i, t in enumerate(ts)] for g, ts in enumerate(texts)]
    config = ProcessorConfig(model=ModelConfig(path=path, device="cpu"), sampling=task.sampling, prompts=task.prompts,
                             packing=PackingConfig(max_group_prompts=2, max_num_seqs=4),
                             actors=ActorsConfig(max_concurrent_batches=3))
    assert config.concurrent_batches == 3
    actor = PrepackActor(config)
    out = {r["id"]: r for rows in concurrently(actor.run_group, [(g,) for g in groups]) for r in rows}
    assert actor.loop.shared and len(out) == 6
    assert out["g1r1"]["error_kind"] == "engine_error" and "IndexError" in out["g1r1"]["error"]
    model, tok = load_model(path, dtype="float32", device="cpu")
    engine = Engine(model, tok)
    for g, ts in enumerate(texts):
        for i, t in enumerate(ts):
            if (g, i) != (1, 1):
                ref = engine.generate([t], SamplingParams(max_new_tokens=5))[0]
                assert out[f"g{g}r{i}"]["error"] is None and out[f"g{g}r{i}"]["generated_text"] == ref.text


def test_default_concurrency_fills_max_num_seqs():
    cfg = ProcessorConfig(packing=PackingConfig(max_group_prompts=64, max_num_seqs=128))
    assert cfg.concurrent_batches == 3
    assert ProcessorConfig(packing=PackingConfig(max_group_prompts=200, max_num_seqs=128)).concurrent_batches == 2
    assert ProcessorConfig(packing=PackingConfig(max_group_prompts=2, max_num_seqs=128)).concurrent_batches == 8
    assert ProcessorConfig(task="score").concurrent_batches == 1
