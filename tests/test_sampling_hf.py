"""vLLM's sampling options against Hugging Face `generate` on each prompt alone.

The engine runs the prompts packed together; HF runs each one alone with the same setting:
repetition_penalty (RepetitionPenaltyLogitsProcessor), min_tokens (min_new_tokens), stop
token ids (an eos_token_id list), logprobs (log_softmax of HF's raw `output_logits`).
Presence and frequency penalties have no HF processor: HF runs with one written from the
formula. n > 1: each completion equals an n = 1 run seeded with that completion's seed.
"""
import random

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.core.sampling import sequence_seeds

NEW = 10


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    return Engine(model, tok)


@pytest.fixture(scope="module")
def prompts(engine):
    rng = random.Random(3)
    return [[rng.randrange(3, engine.model.config.vocab_size) for _ in range(n)] for n in (5, 17, 9, 2)]


def hf(model, prompt, **kwargs):
    """HF generate on one prompt alone: (new token ids, the output dict)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=kwargs.pop("max_new_tokens", NEW), do_sample=False,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences[0, len(prompt):].tolist(), out


class PresenceFrequency(LogitsProcessor):
    """The formula (vLLM's): logit -= frequency x count + presence x (count > 0), generated tokens only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        gen = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_repetition_penalty_greedy_equals_hf(engine, prompts):
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=NEW))
    for penalty in (1.5, 0.6):
        results = engine.generate(prompts, SamplingParams(max_new_tokens=NEW, repetition_penalty=penalty))
        for p, r in zip(prompts, results):
            assert r.token_ids == hf(engine.model, p, repetition_penalty=penalty)[0], penalty
        assert any(r.token_ids != q.token_ids for r, q in zip(results, plain)), penalty  # the penalty acted


def test_presence_frequency_penalties_greedy_equal_hf_with_the_formula(engine, prompts):
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=NEW))
    for presence, frequency, repetition in ((0.0, 0.05, 1.0), (0.04, 0.0, 1.0), (0.03, 0.02, 1.3), (-0.05, 0.0, 1.0)):
        params = SamplingParams(max_new_tokens=NEW, presence_penalty=presence, frequency_penalty=frequency,
                                repetition_penalty=repetition)
        results = engine.generate(prompts, params)
        for p, r in zip(prompts, results):
            # HF applies its repetition penalty first, then the custom processor: vLLM's order.
            ref, _ = hf(engine.model, p, repetition_penalty=repetition,
                        logits_processor=LogitsProcessorList([PresenceFrequency(len(p), presence, frequency)]))
            assert r.token_ids == ref, (presence, frequency, repetition)
        assert any(r.token_ids != q.token_ids for r, q in zip(results, plain)), (presence, frequency)


def test_stop_token_ids_and_min_tokens_equal_hf(engine, prompts):
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=NEW))
    stop_id = plain[0].token_ids[1]  # a token prompt 0 generates early (and again later)
    eos = engine.model.generation_config.eos_token_id
    for min_tokens in (0, 4):
        params = SamplingParams(max_new_tokens=NEW, stop_token_ids=[stop_id], min_tokens=min_tokens)
        results = engine.generate(prompts, params)
        for p, r in zip(prompts, results):
            ref, _ = hf(engine.model, p, eos_token_id=[eos, stop_id], min_new_tokens=min_tokens)
            assert r.token_ids == ref, (min_tokens, p)
            if r.token_ids[-1] == stop_id and len(r.token_ids) > min_tokens:
                assert (r.finish_reason, r.stop_reason) == ("stop", stop_id)
                # vLLM: the stop token stays in token_ids, not in the text.
                assert r.text == engine.tokenizer.decode(r.token_ids[:-1], skip_special_tokens=True)
            else:
                assert (r.finish_reason, r.stop_reason) == ("length", None)
        # min_tokens=0 stops at the first stop_id (token 2); min_tokens=4 holds it back.
        assert (len(results[0].token_ids) == 2) == (min_tokens == 0) and len(results[0].token_ids) > min_tokens


def test_min_tokens_holds_back_eos_like_hf_min_new_tokens(tiny_model_dir, prompts):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    engine = Engine(model, tok)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=NEW))
    eos = free[1].token_ids[2]  # make prompt 1's 3rd greedy token the EOS
    engine.stops.eos_ids = {eos}
    model.generation_config.eos_token_id = eos
    for min_tokens in (0, 5):
        results = engine.generate(prompts, SamplingParams(max_new_tokens=NEW, min_tokens=min_tokens))
        for p, r in zip(prompts, results):
            assert r.token_ids == hf(model, p, min_new_tokens=min_tokens)[0], min_tokens
            assert r.stop_reason is None  # EOS is no stop_reason (vLLM)
        assert (len(results[1].token_ids) == 3) == (min_tokens == 0)
    # ignore_eos: EOS is an ordinary token, min_tokens or not.
    r = engine.generate([prompts[1]], SamplingParams(max_new_tokens=NEW, ignore_eos=True, min_tokens=5))[0]
    assert len(r.token_ids) == NEW and r.token_ids[:3] == free[1].token_ids[:3]


def test_min_tokens_holds_back_stop_strings(engine, prompts):
    free = engine.generate([prompts[2]], SamplingParams(max_new_tokens=NEW))[0]
    head = engine.tokenizer.decode(free.token_ids[:2], skip_special_tokens=True)
    stop = head[-2:]  # ends within the first two tokens' text
    early = engine.generate([prompts[2]], SamplingParams(max_new_tokens=NEW, stop=[stop]))[0]
    assert early.finish_reason == "stop" and len(early.token_ids) <= 2 and early.stop_reason == stop
    late = engine.generate([prompts[2]], SamplingParams(max_new_tokens=NEW, stop=[stop], min_tokens=2))[0]
    assert len(late.token_ids) > 2 and late.token_ids == free.token_ids[:len(late.token_ids)]
    if late.finish_reason == "stop":  # a later occurrence, ending after the first two tokens
        assert late.text.find(stop) == -1 and len(late.text) >= len(head) - len(stop) + 1


def test_logprobs_are_log_softmax_of_hf_raw_logits(engine, prompts):
    k = 3
    for penalty in (1.0, 1.5):
        results = engine.generate(prompts, SamplingParams(max_new_tokens=NEW, logprobs=k, repetition_penalty=penalty))
        raw_differs_from_processed = False
        for p, r in zip(prompts, results):
            ref_ids, out = hf(engine.model, p, repetition_penalty=penalty, output_logits=True, output_scores=True)
            assert r.token_ids == ref_ids and len(r.logprobs) == len(ref_ids)
            for t, (tok_id, step) in enumerate(zip(r.token_ids, r.logprobs)):
                ref = out.logits[t][0].float().log_softmax(-1)
                entries = list(step.items())
                assert entries[0][0] == tok_id  # the chosen token first
                assert abs(entries[0][1].logprob - ref[tok_id].item()) < 1e-4
                assert entries[0][1].rank == int((ref > ref[tok_id]).sum()) + 1
                top = ref.topk(k)
                assert {i: lp.rank for i, lp in entries[1:]} == {
                    i: j + 1 for j, i in enumerate(top.indices.tolist()) if i != tok_id}
                for i, lp in entries:
                    assert abs(lp.logprob - ref[i].item()) < 1e-4
                processed = out.scores[t][0].float().log_softmax(-1)
                raw_differs_from_processed |= abs(processed[tok_id].item() - ref[tok_id].item()) > 1e-3
        assert raw_differs_from_processed == (penalty != 1.0)  # raw, not the penalised distribution
    only_chosen = engine.generate(prompts[:1], SamplingParams(max_new_tokens=3, logprobs=0))[0]
    assert [list(d) for d in only_chosen.logprobs] == [[t] for t in only_chosen.token_ids]
    assert engine.generate(prompts[:1], SamplingParams(max_new_tokens=3))[0].logprobs is None


def test_n_completions_equal_n1_runs_with_their_seeds(engine, prompts):
    """Prefill once, n sequences: completion i == the prompt alone, n = 1, seed sequence_seeds(seed, n)[i]."""
    rich = dict(temperature=1.0, top_k=50, top_p=0.95, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.1,
                frequency_penalty=0.1, logprobs=1, min_tokens=2, max_new_tokens=NEW)
    params = [SamplingParams(n=3, seed=11, **rich), SamplingParams(n=1, seed=5, **rich),
              SamplingParams(n=2, seed=9, temperature=0.8, max_new_tokens=6), SamplingParams(n=2, max_new_tokens=4)]
    results = engine.generate(prompts, params)
    assert [len(r.outputs) for r in results] == [3, 1, 2, 2]
    for p, sp, r in zip(prompts, params, results):
        assert r.token_ids == r.outputs[0].token_ids and r.text == r.outputs[0].text
        assert r.num_generated_tokens == sum(len(o.token_ids) for o in r.outputs)
        assert [o.index for o in r.outputs] == list(range(sp.n))
        if sp.seed is None:  # greedy: n identical copies
            assert all(o.token_ids == r.token_ids for o in r.outputs)
            continue
        assert len({tuple(o.token_ids) for o in r.outputs}) == sp.n  # sampled: n different completions
        for i, seed in enumerate(sequence_seeds(sp.seed, sp.n)):
            # alone, in another batch (the other prompts reversed), n = 1 with that seed
            others = [q for q in prompts if q is not p][::-1]
            alone = engine.generate(others + [p], [SamplingParams(max_new_tokens=3)] * len(others) +
                                    [SamplingParams(**{**sp.__dict__, "n": 1, "seed": seed})])[-1]
            assert alone.token_ids == r.outputs[i].token_ids, (sp.seed, i)
            if sp.logprobs is not None:
                assert [list(d) for d in alone.logprobs] == [list(d) for d in r.outputs[i].logprobs]
