"""Every causal LM family: packed (or the route capability_of picks) equals each prompt alone in HF,
or the documented refusal. Never a silent mismatch.

Random-weight configurations from transformers' own config classes, tiny (hidden 32, 2 layers,
vocabulary 128), with every length-dependent feature set to trigger at short lengths: sliding
windows and chunks of 8, LongRoPE original length 32, temperature-tuning floor 32. Prompts are
token ids (no tokenizer). fp32: last-token logits within 1e-4, identical greedy tokens.
"""
from __future__ import annotations

import random
from pathlib import Path
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prepack_actor import Engine, EngineConfig, SamplingParams
from prepack_actor.capability import PACKED, PACKED_BUCKETED, UNPACKED, UnsupportedModel, capability_of
from prepack_actor.core.forward import plain_sdpa
from prepack_actor.models import model_class, resolve_attn

VOCAB, NEW_TOKENS = 128, 8
REFUSED = "refused"
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, initializer_range=0.25)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32)
SW = dict(sliding_window=8)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_expand=2, mamba_d_state=4, mamba_n_groups=1)
LONGROPE = dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.1, 1.2, 1.3],
                                     long_factor=[2.0, 3.0, 5.0, 9.0], original_max_position_embeddings=32),
                original_max_position_embeddings=32)

# (id, model_type, config overrides, expected route or "refused")
CASES = [
    ("llama", "llama", {}, PACKED),
    ("mistral-sw8", "mistral", SW, PACKED),
    ("qwen2-sw8", "qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), PACKED),
    ("qwen3", "qwen3", {}, PACKED),
    ("qwen3_moe", "qwen3_moe", MOE, PACKED),
    ("qwen2_moe", "qwen2_moe", MOE, PACKED),
    ("mixtral-sw8", "mixtral", {**MOE, **SW}, PACKED),
    ("gemma", "gemma", {}, PACKED),
    ("gemma2-sw8", "gemma2", SW, PACKED),
    ("gemma3_text-sw8", "gemma3_text", dict(sliding_window=8, sliding_window_pattern=2), PACKED),
    ("cohere", "cohere", {}, PACKED),
    ("cohere2-sw8", "cohere2", SW, PACKED),
    ("olmo", "olmo", {}, PACKED),
    ("olmo2", "olmo2", {}, PACKED),
    ("olmo3-sw8", "olmo3", SW, PACKED),
    ("olmoe", "olmoe", MOE, PACKED),
    ("phi", "phi", {}, PACKED),
    ("phi3", "phi3", {}, PACKED),
    ("phi3-longrope32", "phi3", LONGROPE, PACKED_BUCKETED),
    ("phimoe-longrope32", "phimoe", {**MOE, **LONGROPE, "rope_parameters": {**LONGROPE["rope_parameters"], "short_mscale": 1.0,
                                                                "long_mscale": 1.25}}, PACKED_BUCKETED),
    ("stablelm", "stablelm", {}, PACKED),
    ("starcoder2-sw8", "starcoder2", SW, PACKED),
    ("gpt2", "gpt2", {}, PACKED),
    ("gpt_bigcode", "gpt_bigcode", {}, PACKED),
    ("gpt_neo-local8", "gpt_neo", dict(attention_types=[[["global", "local"], 1]], num_layers=2, window_size=8),
     PACKED),
    ("gpt_neox", "gpt_neox", {}, PACKED),
    ("gptj", "gptj", dict(rotary_dim=4), PACKED),
    ("codegen", "codegen", dict(rotary_dim=4), PACKED),
    ("opt", "opt", dict(ffn_dim=64, word_embed_proj_dim=32), PACKED),
    ("bloom-alibi", "bloom", {}, UNPACKED),
    ("falcon", "falcon", dict(head_dim=None), PACKED),
    ("falcon-alibi", "falcon", dict(head_dim=None, alibi=True), UNPACKED),
    ("falcon-new-arch", "falcon", dict(head_dim=None, new_decoder_architecture=True, num_kv_heads=2), PACKED),
    ("mpt-alibi", "mpt", {}, PACKED),
    ("granite", "granite", {}, PACKED),
    ("granitemoe", "granitemoe", MOE, PACKED),
    ("helium", "helium", {}, PACKED),
    ("glm", "glm", {}, PACKED),
    ("glm4", "glm4", {}, PACKED),
    ("smollm3-nope", "smollm3", dict(no_rope_layer_interval=2), PACKED),
    ("exaone4-sw8", "exaone4", SW, PACKED),
    ("ministral-sw8", "ministral", SW, PACKED),
    ("arcee", "arcee", {}, PACKED),
    ("seed_oss", "seed_oss", {}, PACKED),
    ("hunyuan_v1_dense", "hunyuan_v1_dense", {}, PACKED),
    ("deepseek_v3-mla", "deepseek_v3", dict(num_key_value_heads=4, n_routed_experts=4, moe_intermediate_size=32, first_k_dense_replace=1,
                                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                        v_head_dim=8, n_group=1, topk_group=1, num_experts_per_tok=2), PACKED),
    ("gpt_oss-sw8", "gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                    sliding_window=8), PACKED),
    ("llama4-chunk8-temp32", "llama4_text", dict(attention_chunk_size=8, floor_scale=32, no_rope_layers=[1, 0],
                                                 num_local_experts=2, intermediate_size_mlp=64,
                                                 interleave_moe_layer_step=2), PACKED_BUCKETED),
    ("llama4-chunk8", "llama4_text", dict(attention_chunk_size=8, attn_temperature_tuning=False, no_rope_layers=[1, 0],
                                          num_local_experts=2, intermediate_size_mlp=64, interleave_moe_layer_step=2),
     PACKED),
    ("nemotron", "nemotron", {}, PACKED),
    ("persimmon", "persimmon", {}, PACKED),
    ("biogpt", "biogpt", {}, PACKED),
    ("ernie4_5", "ernie4_5", {}, PACKED),
    ("jetmoe", "jetmoe", dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=8), PACKED),
    ("apertus", "apertus", {}, PACKED),
    ("diffllama", "diffllama", {}, PACKED),
    ("vaultgemma-sw8", "vaultgemma", SW, PACKED),
    ("internlm3", "internlm3", {}, PACKED),
    ("xglm", "xglm", dict(ffn_dim=64), PACKED),
    ("bart-decoder", "bart", dict(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64), UNPACKED),
    ("openai-gpt", "openai-gpt", {}, UNPACKED),
    ("ctrl", "ctrl", dict(dff=64), PACKED),
    ("roberta-decoder", "xlm-roberta", dict(is_decoder=True), REFUSED),
    ("mamba", "mamba", dict(state_size=4), UNPACKED),
    ("falcon_mamba", "falcon_mamba", dict(state_size=4), UNPACKED),
    ("jamba", "jamba", dict(num_experts=2, mamba_d_state=4, attn_layer_period=2, attn_layer_offset=1), UNPACKED),
    ("qwen3_next", "qwen3_next", {**MOE, "linear_num_value_heads": 2, "linear_num_key_heads": 2,
                                  "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                                  "layer_types": ["linear_attention", "full_attention"]}, UNPACKED),
    ("lfm2-conv", "lfm2", dict(layer_types=["conv", "full_attention"]), UNPACKED),
    ("minimax-linear", "minimax", MOE, UNPACKED),
    ("recurrent_gemma", "recurrent_gemma", dict(lru_width=32, attention_window_size=8,
                                                 block_types=["recurrent", "attention"]), UNPACKED),
    ("falcon_h1", "falcon_h1", dict(mamba_d_state=4), UNPACKED),
    ("mamba2", "mamba2", dict(num_heads=8, head_dim=8, expand=2, state_size=4, n_groups=1), UNPACKED),
    ("bamba", "bamba", {**MAMBA2, "attn_layer_indices": [1]}, UNPACKED),
    ("granitemoehybrid", "granitemoehybrid", {**MAMBA2, **MOE, "layer_types": ["mamba", "attention"]}, UNPACKED),
    ("nemotron_h", "nemotron_h", dict(hybrid_override_pattern="M*", mamba_num_heads=8, mamba_head_dim=8,
                                      ssm_state_size=4, n_groups=1, expand=2), UNPACKED),
    ("zamba2", "zamba2", dict(layers_block_type=["mamba", "hybrid"], mamba_headdim=8, mamba_d_state=4,
                              mamba_ngroups=1, n_mamba_heads=8), UNPACKED),
    ("gemma3n_text-sw8", "gemma3n_text", dict(sliding_window=8, laurel_rank=4, altup_num_inputs=2,
                                              hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                                              num_kv_shared_layers=0), PACKED),
]


class TokenIds:
    """The tokenizer surface the engine touches, for token-id prompts."""
    pad_token_id, eos_token_id = 0, None

    def __len__(self):
        return VOCAB

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def build(model_type: str, overrides: dict, attn: str):
    kwargs = {**BASE, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None  # every prompt runs its NEW_TOKENS
    # prepack follows SamplingParams, not a checkpoint's generation defaults (Bart forces EOS last)
    model.generation_config.forced_eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


PARAMS = [pytest.param(mt, ov, route, attn, id=f"{name}-{attn}") for name, mt, ov, route in CASES
          for attn in ("sdpa", "eager")]


def alone(model, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    with torch.inference_mode(), plain_sdpa(model):
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_type,overrides,route,attn", PARAMS)
def test_matches_each_prompt_alone(model_type, overrides, route, attn):
    check_matches_alone(model_type, overrides, route, attn)


# Head dim 16 (hidden 64): the C++ CPU kernels serve (BASE's head dim 8 is torch's ops). Case
# id -> the kernels that must have run besides prefill and decode attention (phi, gpt_neox:
# partial rotary, their RoPE stays torch's; gemma: its norm is weight + 1, refused by the probe).
KERNEL_CASES = {"llama": {"rms_norm", "rope"}, "mistral-sw8": {"rms_norm", "rope"}, "qwen2-sw8": {"rms_norm", "rope"},
                "qwen3": {"rms_norm", "rope"}, "gemma": {"rope"}, "gemma3_text-sw8": {"rope"}, "olmo2": {"rms_norm", "rope"},
                "phi": set(), "phi3": {"rms_norm", "rope"}, "starcoder2-sw8": {"rope"},
                "gpt_neox": set(), "granite": {"rms_norm", "rope"}, "glm4": {"rms_norm"}, "exaone4-sw8": {"rms_norm", "rope"},
                "smollm3-nope": {"rms_norm", "rope"}, "gpt2": set(), "qwen3_moe": {"rms_norm", "rope"}}


@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_cpu_kernels_match_each_prompt_alone(name, monkeypatch):
    from prepack_actor.core import cpu_ops

    ops, calls = cpu_ops.ops(), set()
    assert ops is not None, "CI builds the C++ kernels (g++ and ninja are installed)"

    class Spy:
        def __getattr__(self, op):
            calls.add(op)
            return getattr(ops, op)

    monkeypatch.setattr(cpu_ops, "ops", Spy)
    _, model_type, overrides, route = next(c for c in CASES if c[0] == name)
    check_matches_alone(model_type, {**overrides, "hidden_size": 64, "head_dim": 16}, route, "sdpa")
    assert {"prefill_attention", "decode_attention"} | KERNEL_CASES[name] <= calls, calls


def check_matches_alone(model_type, overrides, route, attn):
    torch.set_num_threads(1)
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in {**BASE, **overrides}.items() if v is not None})
    if attn == "sdpa" and not model_class(cfg)._supports_sdpa:  # no sdpa in transformers: refused, auto -> eager
        with pytest.raises(UnsupportedModel, match=model_type):
            resolve_attn(cfg, "sdpa")
        assert resolve_attn(cfg, "auto") == "eager"
        return
    model = build(model_type, overrides, attn)
    if route == REFUSED:
        with pytest.raises(UnsupportedModel, match=model_type):
            capability_of(model)
        return
    cap = capability_of(model)
    assert cap.route == route, cap
    rng = random.Random(len(model_type))
    lengths = [5, 60, 17, 29, 40, 9] if route != UNPACKED else [5, 23, 11]
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = Engine(model, TokenIds(), EngineConfig(pack_capacity=64))
        logits = engine.prefill(prompts)
        results = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    paths = {r.engine_path for r in results}
    # Bucketed: these lengths put some prompts across the threshold (they run alone), others in buckets.
    assert paths == ({PACKED_BUCKETED, UNPACKED} if route == PACKED_BUCKETED else {route})
    for i, p in enumerate(prompts):
        ref_logits, ref_tokens = alone(model, p)
        torch.testing.assert_close(logits[i], ref_logits, atol=1e-4, rtol=0, msg=f"prompt {i} (len {len(p)})")
        assert results[i].token_ids == ref_tokens, f"prompt {i} (len {len(p)}) greedy differs"


def test_unpacked_paths_equal_packed_on_a_packed_model(tiny_model_dir):
    """The fallback's own machinery (Sampler as a logits processor, stops, n, logprobs; per-pair
    scoring) gives what the packed path gives, on a model both can run."""
    from prepack_actor import load_model, unpacked
    from prepack_actor.scoring import Scorer

    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    engine = Engine(model, tok)
    prompts = ["The sea is", "Once upon a time there was", "Hi"]
    ids = engine.encode(prompts)
    params = [SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3, n=2, repetition_penalty=1.2,
                             logprobs=2),
              SamplingParams(max_new_tokens=6, min_tokens=2, stop_token_ids=[5, 6, 7, 8]),
              SamplingParams(max_new_tokens=5, ignore_eos=True)]
    packed = engine.generate(prompts, params)
    model.generation_config.repetition_penalty = 5.0  # a checkpoint's defaults must not leak into HF generate
    model.generation_config.no_repeat_ngram_size = 1
    for padded in (False, True):
        alone = unpacked.generate(engine, ids, params, padded)
        for p, a in zip(packed, alone):
            assert [o.token_ids for o in a.outputs] == [o.token_ids for o in p.outputs]
            assert (a.finish_reason, a.stop_reason, a.text) == (p.finish_reason, p.stop_reason, p.text)
            assert a.engine_path == UNPACKED and p.engine_path == PACKED
        assert [set(d) for d in alone[0].logprobs] == [set(d) for d in packed[0].logprobs]
    torch.testing.assert_close(unpacked.prefill(engine, ids, True), engine.prefill(prompts), atol=1e-4, rtol=0)

    scorer = Scorer(model, tok)
    prepared = [scorer.prepare({"prompt": "Q: the sea is", "choices": [" blue", " very wide", " x"], "answer": 0}),
                scorer.prepare({"prompt": "Capital of France?", "choices": [" Paris", " Rome"]})]
    for a, b in zip(unpacked.score(scorer, prepared), scorer.score_prepared(prepared)):
        torch.testing.assert_close(torch.tensor(a.choice_logprobs), torch.tensor(b.choice_logprobs), atol=1e-4, rtol=0)
        assert (a.choice_num_tokens, a.choice_is_greedy, a.pred, a.pred_norm) == \
               (b.choice_num_tokens, b.choice_is_greedy, b.pred, b.pred_norm)
        assert a.engine_path == UNPACKED and b.engine_path == PACKED


def test_job_preflight_and_engine_path(tiny_model_dir, tmp_path):
    """The job: preflight reads the route (refusing an explicit sdpa the class lacks), rows record it."""
    import shutil

    from prepack_actor.job.actor import PrepackActor
    from prepack_actor.job.config import ConfigError, ModelConfig, ProcessorConfig, SamplingConfig
    from prepack_actor.job.generate import GenerateTask
    from prepack_actor.job.config import PromptsConfig
    from prepack_actor.job.rows import parse_jsonl_shard
    from prepack_actor.job.stage import Processor
    from prepack_actor.models import load_tokenizer

    tok_dir = tiny_model_dir("gpt2")
    tok, _ = load_tokenizer(tok_dir)
    bloom = tmp_path / "bloom"
    build("bloom", dict(vocab_size=len(tok)), "eager").save_pretrained(bloom)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tok_dir) / f).exists():
            shutil.copy(Path(tok_dir) / f, bloom / f)

    def config(attn):
        return ProcessorConfig(task="generate", model=ModelConfig(path=str(bloom), cache_dir=str(tmp_path), device="cpu",
                                                                  attn_implementation=attn),
                               sampling=SamplingConfig(max_new_tokens=3))
    with pytest.raises(ConfigError, match="bloom.*no sdpa"):
        Processor(config("sdpa"))
    processor = Processor(config("auto"))
    assert processor.capability.route == UNPACKED and processor.capability.as_dict()["padded"]
    task = GenerateTask(SamplingConfig(max_new_tokens=3, seed=0), PromptsConfig())
    rows = [task.prepare_row(r, tok, 2048) for r in
            parse_jsonl_shard(b'{"id": "a", "prompt": "The sea"}\n{"id": "b", "prompt": "Hi there you"}\n', "s.jsonl")]
    out = PrepackActor(config("auto")).run_group(rows)
    assert [r["engine_path"] for r in out] == [UNPACKED, UNPACKED]
    assert all(r["error"] is None and len(r["generated_tokens"]) == 3 for r in out)


@pytest.mark.parametrize("model_type,overrides,block", [
    ("llama", {}, True),
    ("jetmoe", dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=8), True),  # kv heads tiled: reordered
    ("diffllama", {}, False)])  # splits V between the cache and attention: left-padded decode
def test_block_decode_is_used_exactly_where_attention_reads_the_cache_as_stored(model_type, overrides, block):
    model = build(model_type, overrides, "sdpa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(model, TokenIds(), EngineConfig(pack_capacity=64))
    assert engine.varlen and engine.block_decode == block
    assert (engine.decode_refusal is None) == block
    assert any("left-padded cache" in str(w.message) for w in caught) == (not block)


@pytest.mark.parametrize("case", ["llama", "mistral-sw8", "phi3-longrope32", "bloom-alibi", "mamba"])
def test_rolling_loglikelihood_follows_the_route(case):
    """Scorer.rolling_loglikelihood (lm-eval's loglikelihood_rolling) on every route equals the
    model run alone on each window: a recurrent or ALiBi model is never packed by it."""
    from prepack_actor.loglik import rolling_requests
    from prepack_actor.scoring import Scorer

    torch.set_num_threads(1)
    _, model_type, overrides, route = next(c for c in CASES if c[0] == case)
    model = build(model_type, overrides, "eager" if route == UNPACKED else "sdpa")
    rng = random.Random(7)
    docs = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (70, 9, 41)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = Scorer(model, TokenIds()).rolling_loglikelihood(docs, prefix_token=1, max_length=24)
    for doc, r in zip(docs, got):
        want, greedy = 0.0, True
        for w in rolling_requests(doc, 1, 24):  # HF alone, window by window
            with torch.inference_mode(), plain_sdpa(model):
                logits = model(torch.tensor([w.context + w.continuation[:-1]])).logits[0].float()
            lp = torch.log_softmax(logits[-len(w.continuation):], -1)
            target = torch.tensor(w.continuation)
            want += lp.gather(1, target[:, None]).sum().item()
            greedy &= bool((lp.argmax(-1) == target).all())
        assert abs(r.logprob - want) < 1e-3 and abs(r.logprob - want) / abs(want) < 1e-5, (case, r.logprob, want)
        assert (r.is_greedy, r.num_tokens) == (greedy, len(doc))
