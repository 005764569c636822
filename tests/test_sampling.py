"""Seeded sampling: a prompt's tokens depend on its seed only, not on its batch."""
import random

import pytest
import torch

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.core.sampling import Sampler, sequence_seeds, warp


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    return Engine(model, tok)


def test_same_seed_same_tokens_alone_and_in_mixed_batch(engine):
    rng = random.Random(0)
    vocab = engine.model.config.vocab_size
    target = [rng.randrange(3, vocab) for _ in range(9)]
    others = [[rng.randrange(3, vocab) for _ in range(n)] for n in (30, 2, 17, 9, 25)]
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate([target], params)[0].token_ids
    mixed_params = [SamplingParams(max_new_tokens=n, temperature=0.8, seed=s)
                    for n, s in zip((5, 20, 12, 3, 8), range(5))]
    mixed = engine.generate(others[:2] + [target] + others[2:], mixed_params[:2] + [params] + mixed_params[2:])
    assert mixed[2].token_ids == alone
    other_seed = engine.generate([target], SamplingParams(max_new_tokens=20, temperature=1.0,
                                                          top_p=0.95, top_k=50, seed=99))[0].token_ids
    assert other_seed != alone  # the seed matters (20 tokens from a ~1000-token vocabulary)


def test_sampler_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 400)
    top_k = Sampler([SamplingParams(temperature=1.0, top_k=2, seed=i) for i in range(400)], torch.device("cpu"))
    assert set(top_k(logits).tokens.tolist()) == {0, 1}
    # softmax mass: 0.64, 0.24, 0.09, ... -> top_p 0.8 keeps tokens 0 and 1 only
    top_p = Sampler([SamplingParams(temperature=1.0, top_p=0.8, seed=i) for i in range(400)], torch.device("cpu"))
    assert set(top_p(logits).tokens.tolist()) == {0, 1}
    greedy = Sampler([SamplingParams()] * 3, torch.device("cpu"))
    assert greedy(logits[:3]).tokens.tolist() == [0, 0, 0]


def test_sampler_frequencies_follow_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]]).expand(4000, 3)
    s = Sampler([SamplingParams(temperature=1.0, seed=i) for i in range(4000)], torch.device("cpu"))
    freq = torch.bincount(s(logits).tokens, minlength=3).float() / 4000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"top_k": 2.5}, "top_k: expected an int"),
    ({"min_p": 1.5}, r"min_p: expected a number in \[0, 1\]"), ({"n": 0}, "n: expected an int >= 1"),
    ({"repetition_penalty": 0}, "repetition_penalty: expected a number > 0"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logprobs": -1}, "logprobs: expected null or an int >= 0"), ({"seed": "x"}, "seed"),
    ({"min_tokens": 5, "max_new_tokens": 4}, r"min_tokens: expected an int <= max_new_tokens \(4\), got 5"),
    ({"stop_token_ids": [1, "a"]}, "stop_token_ids"), ({"stop": [1]}, "stop: expected a string"),
    ({"temperature": True}, "temperature"), ({"temperature": float("nan")}, "temperature")])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_overrides_name_the_key_and_vllm_names():
    base = SamplingParams(max_new_tokens=8, temperature=0.5)
    p = base.with_overrides({"temperature": 1, "top_k": 5, "stop": "x", "logprobs": None})
    assert (p.temperature, p.top_k, p.stop, p.logprobs, p.max_new_tokens) == (1.0, 5, ["x"], None, 8)
    with pytest.raises(ValueError, match="max_tokens: unknown sampling key \\(vLLM's max_tokens is max_new_tokens"):
        base.with_overrides({"max_tokens": 3})
    with pytest.raises(ValueError, match="temprature: unknown sampling key"):
        base.with_overrides({"temprature": 3})


def test_sequence_seeds_are_fixed_and_distinct():
    seeds = sequence_seeds(7, 4)
    assert seeds[0] == 7 and len(set(seeds)) == 4 and seeds == sequence_seeds(7, 4)
    assert sequence_seeds(7, 2) == seeds[:2] and sequence_seeds(8, 2)[1] != seeds[1]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.1), (0.7, 50, 0.9, 0.05), (1.3, 10, 1.0, 0.2), (0.5, 0, 0.8, 0.0), (1.0, 3, 0.5, 0.3)])
def test_warp_keeps_the_tokens_hf_warpers_keep(temperature, top_k, top_p, min_p):
    """temperature -> top_k -> top_p -> min_p: the same kept set and distribution as HF's warpers."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    logits = torch.randn(6, 200, generator=torch.Generator().manual_seed(0)) * 1.5
    chain = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
        ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p else [])
    ref = LogitsProcessorList(chain)(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    b = len(logits)
    kept, order = warp(logits, torch.full((b,), temperature), torch.full((b,), top_k), torch.full((b,), top_p),
                       torch.full((b,), min_p))
    ours = torch.full_like(logits, float("-inf")).scatter(-1, order, kept)  # back to vocabulary order
    assert torch.equal(ours.isfinite(), ref.isfinite())
    kept_per_row = ours.isfinite().sum(-1)
    assert int(kept_per_row.max()) > 1 and int(kept_per_row.min()) < 200  # the filters bite, not all or nothing
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), atol=1e-6, rtol=0)


def test_presence_and_frequency_penalties_follow_the_formula():
    """Greedy over fixed logits: each step subtracts frequency x count + presence x (count > 0)
    from the tokens generated so far (vLLM's definition; HF has no such processor)."""
    logits = torch.tensor([[3.0, 2.9, 2.5, 1.0, 0.0], [1.0, 0.0, 0.5, 0.2, 0.9]])
    cases = [dict(frequency_penalty=0.3), dict(presence_penalty=0.45), dict(frequency_penalty=0.2, presence_penalty=0.3),
             dict(frequency_penalty=-0.5)]
    for kw in cases:
        sampler = Sampler([SamplingParams(**kw)] * 2, torch.device("cpu"))
        counts = torch.zeros_like(logits)
        for _ in range(8):
            expected = (logits - kw.get("frequency_penalty", 0) * counts
                        - kw.get("presence_penalty", 0) * (counts > 0).float()).argmax(-1)
            got = sampler(logits).tokens
            assert got.tolist() == expected.tolist(), kw
            counts[torch.arange(2), got] += 1
        if kw.get("frequency_penalty", 0) > 0 or kw.get("presence_penalty", 0) > 0:
            assert (counts > 0).sum() > 2, kw  # the penalty moved greedy off its first choice


def test_min_tokens_masks_eos_and_stop_ids_then_frees_them():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # EOS = 1 is the argmax, stop id 2 next
    s = Sampler([SamplingParams(min_tokens=2, stop_token_ids=[2])], torch.device("cpu"), eos_ids={1})
    assert [s(logits).tokens.item() for _ in range(3)] == [3, 3, 1]
    free = Sampler([SamplingParams(min_tokens=1, ignore_eos=True)], torch.device("cpu"), eos_ids={1})
    assert free(logits).tokens.item() == 1  # ignore_eos: EOS is an ordinary token, never masked
