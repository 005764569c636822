"""Continuous batching over the block cache equals each prompt alone, whatever joins or leaves.

A small max_num_seqs makes prompts wait and join the running batch mid-decode; the oracle
is HF generate on each prompt alone (greedy tokens identical) and, for sampling, the same
call with another max_num_seqs or on the left-padded reference path (block_decode=False).
"""
import random

import pytest
import torch

from prepack_actor import Engine, EngineConfig, SamplingParams, build_tiny_model, load_model
from prepack_actor.core.finish import EOS, LENGTH, RUNNING, STOP_ID, Finisher
from prepack_actor.core.block_cache import BlockCache
from prepack_actor.scheduler import Scheduler
from test_engine import hf_alone_greedy, random_prompts

LENGTHS = [5, 31, 1, 12, 20, 3, 9, 17]
MAX_NEW = [64, 1, 7, 33, 2, 50, 16, 64]  # 1 to 64 in one call


def run_all(model, tok, prompts, params, **cfg):
    engine = Engine(model, tok, EngineConfig(**cfg))
    return engine, engine.generate(prompts, params)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "gpt2", "llama-eager"])
def model_and_tok(request, tmp_path_factory):
    arch, _, attn = request.param.partition("-")
    kw = {"sliding_window": 8} if arch == "mistral" else {}  # windows bite on the longer prompts
    path = build_tiny_model(arch, tmp_path_factory.mktemp(arch), **kw)
    return load_model(str(path), dtype="float32", device="cpu", attn_implementation=attn or "sdpa")


def test_admitted_mid_decode_greedy_equals_each_prompt_alone(model_and_tok):
    model, tok = model_and_tok
    prompts = random_prompts(model.config.vocab_size, LENGTHS, 1)
    params = [SamplingParams(max_new_tokens=m) for m in MAX_NEW]
    engine, results = run_all(model, tok, prompts, params, max_num_seqs=3)
    # sdpa models decode from the block cache; eager ones fall back to left-padded groups
    assert engine.block_decode == (model.config._attn_implementation != "eager")
    if engine.block_decode:
        assert max(r.pack_prompts for r in results) <= 3 and max(r.queue_s for r in results) > 0
        assert engine.keys_read == engine.keys_real  # the loop kernel reads only real keys
    for p, m, r in zip(prompts, MAX_NEW, results):
        assert r.token_ids == hf_alone_greedy(model, p, m), f"prompt of {len(p)} tokens, {m} new"
        assert r.finish_reason == "length" and r.num_generated_tokens == m
        assert 0 <= r.queue_s < r.ttft_s and r.prefill_s > 0 and r.decode_s >= 0


def test_seeded_sampling_unchanged_by_who_shares_the_batch(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    prompts = random_prompts(model.config.vocab_size, LENGTHS, 2)
    params = [SamplingParams(max_new_tokens=m, temperature=0.9, top_p=0.95, seed=s, n=1 + s % 3)
              for s, m in enumerate(MAX_NEW)]
    # penalties, min_tokens and logprobs on some rows only: joining batches merge that state
    params[3] = SamplingParams(max_new_tokens=33, temperature=0.7, seed=3, repetition_penalty=1.3, logprobs=1)
    params[5] = SamplingParams(max_new_tokens=50, temperature=1.1, seed=5, frequency_penalty=0.5, presence_penalty=0.3)
    params[7] = SamplingParams(max_new_tokens=64, temperature=0.8, seed=7, min_tokens=10, stop_token_ids=[4, 5, 6])
    runs = [run_all(model, tok, prompts, params, **cfg)[1] for cfg in
            ({"max_num_seqs": 64}, {"max_num_seqs": 2}, {"max_num_seqs": 5, "sort_by_length": False},
             {"block_decode": False})]
    ref = [[o.token_ids for o in r.outputs] for r in runs[-1]]
    for results in runs[:-1]:
        assert [[o.token_ids for o in r.outputs] for r in results] == ref
    assert all(len(r.outputs) == p.n for r, p in zip(runs[0], params))


def test_n_greedy_copies_and_logprobs_equal_the_reference(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32", device="cpu")
    prompts = random_prompts(model.config.vocab_size, [6, 14, 3], 3)
    params = SamplingParams(max_new_tokens=9, n=3, logprobs=2)
    block = run_all(model, tok, prompts, params, max_num_seqs=4)[1]
    ref = run_all(model, tok, prompts, params, block_decode=False)[1]
    for p, b, r in zip(prompts, block, ref):
        assert [o.token_ids for o in b.outputs] == [hf_alone_greedy(model, p, 9)] * 3
        for ob, orf in zip(b.outputs, r.outputs):
            for db, dr in zip(ob.logprobs, orf.logprobs):
                assert db.keys() == dr.keys()
                assert all(abs(db[t].logprob - dr[t].logprob) < 1e-4 for t in db)


def test_prompt_admitted_after_all_others_finished(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    prompts = random_prompts(model.config.vocab_size, [4, 9, 2], 4)
    engine, results = run_all(model, tok, prompts, SamplingParams(max_new_tokens=5), max_num_seqs=1)
    order = sorted(range(3), key=lambda i: results[i].queue_s)
    for a, b in zip(order, order[1:]):  # one at a time: each prefill starts after the previous one ended
        assert results[b].queue_s >= results[a].ttft_s + results[a].decode_s
    for p, r in zip(prompts, results):
        assert r.token_ids == hf_alone_greedy(model, p, 5) and r.pack_prompts == 1
    assert engine.keys_real > 0


def test_pools_sized_once_and_last_prompts_join_without_waiting(tiny_model_dir, monkeypatch):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    prompts = random_prompts(model.config.vocab_size, [3 + i % 7 for i in range(16)], 2)
    grows, running = [], []
    grow, join = BlockCache._grow, Engine.join
    monkeypatch.setattr(BlockCache, "_grow", lambda self, n: (grows.append(n), grow(self, n)))
    monkeypatch.setattr(Engine, "join", lambda self, run, *a: (running.append(run.batch.size), join(self, run, *a)))
    # 16 slots, packs of 5: after three packs 1 slot is free (under 16 / 8) and 1 prompt waits
    engine, results = run_all(model, tok, prompts, SamplingParams(max_new_tokens=6), max_num_seqs=16,
                              max_group_prompts=5)
    assert grows == []  # new_run sized the pools for the batch's peak
    assert running == [0, 5, 10, 15]  # the last prompt joined at once, not after a pack finished
    for p, r in zip(prompts, results):
        assert r.token_ids == hf_alone_greedy(model, p, 6)


def test_eos_and_stop_strings_while_prompts_join(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32", device="cpu")
    prompts = random_prompts(model.config.vocab_size, [5, 20, 11, 3, 8], 7)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=2))
    free = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    eos = free[1].token_ids[3]
    engine.stops.eos_ids = {eos}
    stopped = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    for f, s in zip(free, stopped):
        cut = f.token_ids.index(eos) + 1 if eos in f.token_ids else len(f.token_ids)
        assert s.token_ids == f.token_ids[:cut]
        assert s.finish_reason == ("stop" if eos in f.token_ids else "length") and s.stop_reason is None
    # ignore_eos runs past it; a stop token id is reported as the stop reason
    assert engine.generate([prompts[1]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids == free[1].token_ids
    r = engine.generate([prompts[1]], SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=[eos]))[0]
    assert r.stop_reason == eos and r.token_ids == free[1].token_ids[:4]
    # a stop string on one prompt, others without one, all in one running batch
    engine.stops.eos_ids = set()
    text = free[2].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    params = [SamplingParams(max_new_tokens=12, stop=[stop] if i == 2 else []) for i in range(len(prompts))]
    out = engine.generate(prompts, params)
    assert out[2].finish_reason == "stop" and out[2].stop_reason == stop and out[2].text == text[: text.index(stop)]
    assert [o.token_ids for i, o in enumerate(out) if i != 2] == [f.token_ids for i, f in enumerate(free) if i != 2]


def test_sliding_window_mixed_layers_decode_past_the_window(tmp_path):
    path = build_tiny_model("qwen2", tmp_path / "m", use_sliding_window=True, sliding_window=6, max_window_layers=1)
    model, tok = load_model(str(path), dtype="float32", device="cpu")
    prompts = random_prompts(model.config.vocab_size, [3, 9, 14, 1, 7], 0)
    results = run_all(model, tok, prompts, SamplingParams(max_new_tokens=20), max_num_seqs=2)[1]
    for p, r in zip(prompts, results):
        assert r.token_ids == hf_alone_greedy(model, p, 20)


def test_finisher_codes_follow_vllm_rules():
    params = [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=9, min_tokens=2, stop_token_ids=[5]),
              SamplingParams(max_new_tokens=9, ignore_eos=True, stop_token_ids=[2])]
    f = Finisher(params, {2}, "cpu")
    assert f.check(torch.tensor([7, 5, 7])).tolist() == [RUNNING, RUNNING, RUNNING]  # min_tokens holds 5 back
    assert f.check(torch.tensor([7, 2, 2])).tolist() == [RUNNING, RUNNING, STOP_ID]  # generated 2 = min_tokens
    f.select(torch.tensor([0, 1]))
    f.extend(Finisher([SamplingParams(max_new_tokens=1)], {2}, "cpu"))
    assert f.check(torch.tensor([2, 2, 9])).tolist() == [EOS, EOS, LENGTH]


def test_scheduler_admits_the_last_prompts_when_they_all_fit():
    s = Scheduler([10, 20, 30], [SamplingParams(), SamplingParams(n=2), SamplingParams()], max_num_seqs=32,
                  max_group_prompts=8, max_group_tokens=1000)
    assert s.admit(29) == []  # 3 free < 32 / 8, and the waiting prompts need 4 sequences
    assert s.admit(28) == [2, 1, 0] and not s.waiting  # 4 free: all of them, at once
    s.add([5], [SamplingParams()])
    assert s.admit(31) == [3]  # one slot, one last prompt


def test_scheduler_admits_in_packs_within_budgets():
    s = Scheduler([10, 50, 30, 20], [SamplingParams(n=2)] + [SamplingParams()] * 3, max_num_seqs=16,
                  max_group_prompts=8, max_group_tokens=70)
    assert s.admit(0) == [1]  # longest first; 50 + 30 > 70 tokens
    assert s.admit(15) == []  # one slot free: under an eighth of 16, wait for more
    assert s.admit(14) == [2, 3]  # prompt 0 asks for n = 2 sequences: no room left
    assert s.admit(13) == [0] and not s.waiting
