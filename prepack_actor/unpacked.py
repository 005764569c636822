"""The unpacked fallback: prompts run the way Hugging Face would, for models packing cannot serve.

capability.py decides the route; this module runs it through HF's own `generate`:
- one prompt (sequence) at a time: recurrent and hybrid models, and prompts a bucketed
  model must run alone;
- left-padded HF batches (Capability.padded): ALiBi built from the 2D mask, exact.

prepack's Sampler picks every token (as a logits processor), so seeds, penalties,
min_tokens and logprobs behave as on the packed path; stops are applied after, with the
engine's StopChecker. Scoring runs each (prompt, choice) pair as its own forward pass.
"""
from __future__ import annotations

import time

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .capability import UNPACKED
from .core.decode import Decoded
from .core.packing import pad_left
from .core.sampling import SamplingParams, Sampler, expand
from .outputs import Admission, StopText, generation_result


class SamplerProcessor(LogitsProcessor):
    """HF logits processor: prepack's Sampler picks the token, which alone stays finite."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.steps = sampler, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = self.sampler(scores)  # scores [B, V]: the raw fp32 logits (no other processor runs)
        self.steps.append(step)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, step.tokens[:, None].to(scores.device), 0.0)


def _batches(lengths: list[int], padded: bool, size: int) -> list[list[int]]:
    """Row indices per HF call: one each, or up to `size` of similar length (left-padded)."""
    if not padded:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[a:a + size] for a in range(0, len(order), size)]


def _hf_generate(model, rows: list[list[int]], pad_id: int, new_tokens: int, processor=None, **options):
    """HF generate on left-padded rows: greedy over whatever the processor leaves, no EOS stop.

    The model's own generation_config (EOS, repetition_penalty, ... from the checkpoint) is
    set aside for the call: transformers fills every unset field from it, and prepack's
    SamplingParams alone decide (as on the packed path)."""
    ids, mask = (t.to(model.device) for t in pad_left(rows, pad_id))  # [B, Lmax] each
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, **options)
    saved, model.generation_config = model.generation_config, GenerationConfig(pad_token_id=pad_id)
    try:
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                              logits_processor=LogitsProcessorList([processor] if processor else []))
    finally:
        model.generation_config = saved


@torch.inference_mode()
def prefill(engine, ids: list[list[int]], padded: bool) -> torch.Tensor:
    """Next-token logits after each prompt, [P, V] fp32, through HF generate's own first step."""
    out = torch.empty(len(ids), engine.model.config.vocab_size)
    for batch in _batches([len(x) for x in ids], padded, engine.config.max_group_prompts):
        gen = _hf_generate(engine.model, [ids[i] for i in batch], engine.pad_id, 1,
                           output_logits=True, return_dict_in_generate=True)
        out[torch.tensor(batch)] = gen.logits[0].float().cpu()  # [B, V] raw logits of the first step
    return out


@torch.inference_mode()
def generate(engine, ids: list[list[int]], params: list[SamplingParams], padded: bool) -> list:
    """One GenerationResult per prompt, in input order, through HF generate."""
    seqs, prompt_of = expand(params)  # one SamplingParams (n = 1) per sequence
    rows = [ids[p] for p in prompt_of]
    decoded: list[Decoded | None] = [None] * len(seqs)
    # One HF generate call is not split into prefill and decode: TTFT is the whole call.
    adm = [Admission(float("inf"), pack_prompts=1, pack_rows=1) for _ in ids]
    for batch in _batches([len(r) for r in rows], padded, engine.config.max_group_prompts):
        t0 = time.perf_counter()
        sampler = Sampler([seqs[s] for s in batch], engine.device, [rows[s] for s in batch], engine.stops.eos_ids)
        processor = SamplerProcessor(sampler)
        longest = max(seqs[s].max_new_tokens for s in batch)
        _hf_generate(engine.model, [rows[s] for s in batch], engine.pad_id, longest, processor)
        engine.sync()
        now = time.perf_counter()
        for b, s in enumerate(batch):
            decoded[s] = _stopped(engine, [int(st.tokens[b]) for st in processor.steps],
                                  [st.logprobs[b] for st in processor.steps] if processor.steps[0].logprobs else None,
                                  seqs[s], now)
            a = adm[prompt_of[s]]
            a.start, a.first = min(a.start, t0), max(a.first, now)
    by_prompt: list[list] = [[] for _ in ids]
    for s, p in enumerate(prompt_of):
        by_prompt[p].append(decoded[s])
    # start = each prompt's own call start: queueing is not measured on this path (ttft = its call).
    return [generation_result(engine.tokenizer, len(ids[p]), by_prompt[p], adm[p], adm[p].start, UNPACKED)
            for p in range(len(ids))]


def _stopped(engine, tokens: list[int], logprobs, params: SamplingParams, now: float) -> Decoded:
    """Cut a sequence's tokens where the decode loop would have stopped it (same rules)."""
    out: list[int] = []
    text = StopText()
    for t in tokens[: params.max_new_tokens]:
        out.append(t)
        stop, stop_at, reason = engine.stops.check(out, params, text)
        if stop:
            return Decoded(out, "stop", stop_at, reason, now, _cut(logprobs, len(out), params))
    return Decoded(out, "length", None, None, now, _cut(logprobs, len(out), params))


def _cut(logprobs, n: int, params: SamplingParams):
    return None if logprobs is None or params.logprobs is None else logprobs[:n]


@torch.inference_mode()
def loglikelihood(model, requests: list) -> list:
    """loglik.Loglik per loglik.Request: each (context, continuation) its own forward, as HF scores it."""
    from .loglik import Loglik

    out = []
    for r in requests:
        pair = r.context + r.continuation
        logits = model(torch.tensor([pair], device=model.device), use_cache=False).logits[0].float()  # [L, V]
        pred = logits[len(r.context) - 1: len(pair) - 1]  # [C, V] predicts the continuation tokens
        target = torch.tensor(r.continuation, device=pred.device)[:, None]  # [C, 1]
        out.append(Loglik(float(torch.log_softmax(pred, -1).gather(-1, target).sum()),
                          bool((pred.argmax(-1) == target[:, 0]).all()), len(r.continuation)))
    return out


def score(scorer, prepared: list) -> list:
    """ScoreResults for (ScoreItem | None, EncodedItem | RollingDoc) entries: each request its own forward."""
    from .scoring import ScoreResult, requests_of, scores

    out = []
    for item, enc in prepared:
        t0 = scorer.now()
        requests = requests_of(enc)
        ls = loglikelihood(scorer.model, requests)
        out.append(ScoreResult(
            **scores(item, enc, ls, scorer.config), num_tokens=sum(len(r.context) + len(r.continuation) for r in requests),
            shared=False, prefill_s=scorer.now() - t0, pack_units=len(ls), pack_rows=len(ls), pack_efficiency=1.0,
            engine_path=UNPACKED))
    return out
