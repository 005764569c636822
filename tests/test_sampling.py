"""Seeded sampling: a prompt's tokens depend on its seed only, not on its batch."""
import random

import pytest
import torch

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.core.sampling import Sampler


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
    assert set(top_k(logits).tolist()) == {0, 1}
    # softmax mass: 0.64, 0.24, 0.09, ... -> top_p 0.8 keeps tokens 0 and 1 only
    top_p = Sampler([SamplingParams(temperature=1.0, top_p=0.8, seed=i) for i in range(400)], torch.device("cpu"))
    assert set(top_p(logits).tolist()) == {0, 1}
    greedy = Sampler([SamplingParams()] * 3, torch.device("cpu"))
    assert greedy(logits[:3]).tolist() == [0, 0, 0]


def test_sampler_frequencies_follow_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]]).expand(4000, 3)
    s = Sampler([SamplingParams(temperature=1.0, seed=i) for i in range(4000)], torch.device("cpu"))
    freq = torch.bincount(s(logits), minlength=3).float() / 4000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k")])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
