"""The central oracle: packed prefill and generation equal each prompt run alone in HF.

Tolerance: fp32 next-token logits within 1e-4 (observed ~3e-7); greedy tokens identical.
"""
import random
import zlib

import pytest
import torch

from prepack_actor import Engine, EngineConfig, SamplingParams, build_tiny_model, load_model
from prepack_actor.core.forward import plain_sdpa  # the reference runs sdpa, not the Engine's prepack_varlen

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
NEW_TOKENS = 16


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def batches(seed: int) -> dict[str, list[int]]:
    """Length patterns the issue names: 1-token, equal lengths, one at capacity, single, many packs."""
    rng = random.Random(seed)
    return {
        "mixed_with_one_token": [1] + [rng.randint(2, 40) for _ in range(7)],
        "equal_lengths": [12] * 4,
        "single": [rng.randint(1, 40)],
        "at_capacity_many_packs": [32] + [rng.randint(1, 31) for _ in range(11)],
    }


def hf_alone_logits(model, prompt):
    with torch.inference_mode(), plain_sdpa(model):
        return model(torch.tensor([prompt])).logits[0, -1].float()


def hf_alone_greedy(model, prompt, n=NEW_TOKENS):
    with torch.inference_mode(), plain_sdpa(model):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=[(a, i) for a in ARCHS for i in ("sdpa", "eager")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model_and_tok(request, tiny_model_dir):
    arch, attn = request.param
    return load_model(tiny_model_dir(arch), dtype="float32", device="cpu", attn_implementation=attn)


def test_packed_equals_each_prompt_alone(model_and_tok, request):
    model, tok = model_and_tok
    seed = zlib.crc32(request.node.callspec.id.encode()) % 1000  # a fixed batch per model
    for name, lengths in batches(seed).items():
        prompts = random_prompts(model.config.vocab_size, lengths, seed)
        # capacity 32 puts one prompt exactly at capacity; 5 prompts a group forces many groups
        cfg = EngineConfig(pack_capacity=32, max_group_prompts=4 if "many" in name else 64)
        engine = Engine(model, tok, cfg)
        logits = engine.prefill(prompts)
        results = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
        # sdpa models prefill on varlen attention (one stream a group), eager ones on dense-mask rows
        assert engine.varlen == (model.config._attn_implementation != "eager")
        if "many" in name:
            assert all(r.pack_rows == 1 for r in results) if engine.varlen else any(r.pack_rows > 1 for r in results)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(logits[i], hf_alone_logits(model, p), atol=1e-4, rtol=0,
                                       msg=f"{name} prompt {i} (len {len(p)}) logits differ")
            ref = hf_alone_greedy(model, p)
            assert results[i].token_ids == ref, f"{name} prompt {i} (len {len(p)}) greedy differs"
            assert results[i].finish_reason == "length"
            assert results[i].num_input_tokens == len(p)
            assert results[i].num_generated_tokens == NEW_TOKENS


def test_string_prompts_tokenize_like_hf(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    prompts = ["Below is an instruction.", "Hi", "The following are multiple choice questions about law."]
    results = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=8))
    for p, r in zip(prompts, results):
        ids = tok(p)["input_ids"]
        assert ids[0] == tok.bos_token_id  # the Llama-style tokenizer adds BOS
        assert r.token_ids == hf_alone_greedy(model, ids, 8)
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("overrides", [
    {"arch": "mistral", "sliding_window": 6},
    {"arch": "qwen2", "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
], ids=["mistral-window", "qwen2-mixed-layers"])
def test_sliding_window_models(tmp_path, overrides):
    """Windowed layers (all, or mixed with full ones) see the same keys packed and alone."""
    overrides = dict(overrides)
    path = build_tiny_model(overrides.pop("arch"), tmp_path / "m", **overrides)
    model, tok = load_model(path, dtype="float32", device="cpu")
    prompts = random_prompts(model.config.vocab_size, [3, 9, 14, 1, 7], 0)
    engine = Engine(model, tok)
    logits = engine.prefill(prompts)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=10))
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], hf_alone_logits(model, p), atol=1e-4, rtol=0)
        assert results[i].token_ids == hf_alone_greedy(model, p, 10)


def test_eos_and_stop_strings_finish_early(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("qwen2"), dtype="float32", device="cpu")
    prompts = random_prompts(model.config.vocab_size, [5, 20, 11, 3], 7)
    engine = Engine(model, tok)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    # EOS: make prompt 1's 4th greedy token the EOS id; it stops there, the others go on.
    eos = free[1].token_ids[3]
    engine.stops.eos_ids = {eos}
    model.generation_config.eos_token_id = eos
    stopped = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    for p, f, s in zip(prompts, free, stopped):
        ref = hf_alone_greedy(model, p, 12)
        assert s.token_ids == ref
        cut = f.token_ids.index(eos) + 1 if eos in f.token_ids else len(f.token_ids)
        assert s.token_ids == f.token_ids[:cut]
        assert s.finish_reason == ("stop" if eos in f.token_ids else "length")
    assert stopped[1].num_generated_tokens <= 4
    # Stop string: a piece of prompt 2's text ends it, and the text stops before it.
    text = free[2].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    engine.stops.eos_ids = set()
    r = engine.generate([prompts[2]], SamplingParams(max_new_tokens=12, stop=[stop]))[0]
    assert r.finish_reason == "stop"
    assert r.text == text[: text.index(stop)]
    assert stop not in r.text


def test_timing_and_pack_fields(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    prompts = random_prompts(model.config.vocab_size, [30, 10, 10, 10, 5, 25], 3)
    dense = Engine(model, tok, EngineConfig(varlen=False)).generate(prompts, SamplingParams(max_new_tokens=4))
    r = dense[0]
    assert r.pack_prompts == 6 and r.pack_rows == 3  # 30 | 25+5 | 10+10+10
    assert r.pack_efficiency == pytest.approx(90 / 90)
    results = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=4))
    assert results[0].pack_prompts == 6 and results[0].pack_rows == 1  # one stream of 90 tokens
    assert [r.token_ids for r in results] == [r.token_ids for r in dense]
    for r in results + dense:
        assert 0 < r.prefill_s <= r.ttft_s and r.decode_s > 0 and r.overhead_s >= 0


def test_max_num_seqs_default_follows_the_device(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    run = Engine(model, tok).new_run([3, 4], [SamplingParams()] * 2)
    assert run.scheduler.max_num_seqs == 256  # None on CPU: vLLM's LLM-class default there
    assert Engine(model, tok, EngineConfig(max_num_seqs=3)).new_run([3], [SamplingParams()]).scheduler.max_num_seqs == 3
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="max_num_seqs must be an int >= 1"):
            EngineConfig(max_num_seqs=bad)
