"""End-to-end generation runners: prefill + N new tokens (greedy, EOS ignored).

- prepack_engine: prepack's `Engine.generate` (one group = the whole batch).
- full_batching_generate: Hugging Face `model.generate` on the left-padded batch.
- hf_continuous_batching: transformers' `model.generate_batch` (paged cache; packs
  prefill internally), with a small explicit ContinuousBatchingConfig.
"""
from __future__ import annotations

import math
from typing import Callable

from transformers import GenerationConfig

from .baselines import padded_generate
from ..engine import Engine, EngineConfig
from ..core.forward import plain_sdpa
from ..core.sampling import SamplingParams
from .measure import Clock, PeakMemory
from .methods import WARM_PROMPTS

CB_PAGE = 256  # tokens per KV block of the paged cache (transformers' default)


def _prepack(model, tokenizer, prompts, n: int) -> tuple[int, float | None]:
    engine = Engine(model, tokenizer, EngineConfig(max_group_prompts=len(prompts),
                                                   max_group_tokens=sum(map(len, prompts))))
    res = engine.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
    return sum(r.num_generated_tokens for r in res), max(r.ttft_s for r in res)


def _padded(model, tokenizer, prompts, n: int) -> tuple[int, float | None]:
    out = padded_generate(model, prompts, tokenizer.pad_token_id, n, ignore_eos=True)
    return sum(len(o) for o in out), None


def _continuous(model, tokenizer, prompts, n: int, max_batch_tokens: int) -> tuple[int, float | None]:
    from transformers import ContinuousBatchingConfig
    blocks = sum(math.ceil((len(p) + n) / CB_PAGE) for p in prompts) + len(prompts)
    cb = ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=max(max_batch_tokens, max(map(len, prompts))))
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with plain_sdpa(model):  # continuous batching accepts sdpa / paged|eager / flash only
        out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                                   progress_bar=False)
    return sum(len(o.generated_tokens) for o in out.values()), None


def generate_runner(method: str, model, tokenizer, prompts: list[list[int]], new_tokens: int,
                    cb_max_batch_tokens: int = 2048) -> Callable[[bool], dict]:
    fn = {"prepack_engine": _prepack, "full_batching_generate": _padded,
          "hf_continuous_batching": lambda *a: _continuous(*a, cb_max_batch_tokens)}[method]

    def run(warm: bool) -> dict:
        batch = prompts[:WARM_PROMPTS] if warm else prompts
        n = min(new_tokens, 4) if warm else new_tokens
        clock = Clock(model.device)
        with PeakMemory(model.device) as mem:
            clock.mark()
            generated, ttft = fn(model, tokenizer, batch, n)
            clock.mark()
        (total,) = clock.seconds()
        return {"total_s": total, "ttft_s": ttft if ttft is not None else float("nan"),
                "output_tokens": generated, "output_tokens_per_s": generated / total,
                "requests_per_s": len(batch) / total, "peak_memory_bytes": mem.bytes}

    return run
