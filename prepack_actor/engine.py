"""The engine: the public entry point a notebook, the Ray actor and the benchmark call.

    engine = Engine(model, tokenizer)
    results = engine.generate(["Hello", "Once upon a time"], SamplingParams(max_new_tokens=32))

The main loop reads like nano-vllm's step (scheduler.py): admit waiting prompts into the
running batch (one packed prefill), decode one token for every running sequence, retire
the finished ones. Decode reads a block cache holding only real keys (core/block_cache.py).
Models the varlen path refuses, and EngineConfig(block_decode=False), decode static groups
from a left-padded cache instead (pack, prefill, unpack, decode; core/decode.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import routes
from .capability import PACKED, UNPACKED
from .core import kv_cache
from .core.block_attention import FLASH_PAGE
from .core.block_cache import BLOCK_SIZE, BlockCache
from .core.decode import block_decode_refusal, block_step, decode
from .core.finish import Finisher
from .core.forward import enable_varlen, last_token_logits
from .core.grouping import GroupConfig
from .core.packing import pack
from .core.sampling import Logprob, Sampler, SamplingParams, expand
from .inputs import Prompt, encode_prompts
from .models import ModelRunner, on_kernels
from .scheduler import Admission, Batch, Run, Scheduler, Seq


@dataclass
class EngineConfig(GroupConfig):
    sort_by_length: bool = True  # group similar lengths (fuller packs, similar decode lengths)
    # Prefill on varlen attention, one stream per group, where the model allows it
    # (forward.varlen_refusal); False = the dense-mask rows of pack_capacity (the reference).
    varlen: bool = True
    # CPU: linear layers on oneDNN with prepacked weights (core/linear.py; 10-15% faster
    # prefill here, at the cost of a second copy of the weights); False = torch's F.linear.
    onednn_linear: bool = True
    # Decode from a block cache of real keys only, prompts admitted as others finish
    # (needs varlen); False = static groups from a left-padded cache (the reference).
    block_decode: bool = True
    max_num_seqs: int = 128  # sequences decoding at once (block decode), >= 1 (docs/decode.md)
    block_size: int | None = None  # tokens per cache block, >= 1; None = 8 on CPU, 256 on CUDA (paged flash)

    def __post_init__(self):
        super().__post_init__()
        for key in ("max_num_seqs", "block_size"):
            value = getattr(self, key)
            if (value is not None or key != "block_size") and (not isinstance(value, int) or isinstance(value, bool)
                                                                or value < 1):
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")


@dataclass
class Completion:
    """One of a prompt's n completions (vLLM's CompletionOutput)."""
    index: int  # 0 .. n-1; sequence i is seeded by sampling.sequence_seeds(seed, n)[i]
    text: str  # generated text, special tokens skipped, without the stop string or stop token
    token_ids: list[int]  # generated token ids (the EOS or stop token id that ended it included)
    finish_reason: str  # "stop" (EOS, stop token id or stop string) | "length" (max_new_tokens)
    stop_reason: str | int | None  # the stop string or stop token id that ended it; None otherwise (EOS too)
    logprobs: list[dict[int, Logprob]] | None  # per token: chosen token first, then the top k (when asked)


@dataclass
class GenerationResult:
    text: str  # outputs[0].text: generated text, special tokens skipped, cut before a stop string
    token_ids: list[int]  # outputs[0].token_ids (EOS included when it ended the prompt)
    finish_reason: str  # outputs[0].finish_reason: "stop" (EOS, stop id or string) | "length"
    num_input_tokens: int
    num_generated_tokens: int  # over all n completions
    prefill_s: float  # forward pass over the packed prompts this prompt was prefilled with
    ttft_s: float  # hand-over (the generate call's start) to this prompt's first token
    decode_s: float  # first token to this prompt's last token
    overhead_s: float  # packing + cache fill + first sampling of its prefill
    pack_prompts: int  # prompts in the group (rows before packing)
    pack_rows: int  # packed rows after packing
    pack_efficiency: float  # real tokens / packed slots, in (0, 1]
    stop_reason: str | int | None = None  # outputs[0].stop_reason
    logprobs: list[dict[int, Logprob]] | None = None  # outputs[0].logprobs
    outputs: list[Completion] = field(default_factory=list)  # all n completions (SamplingParams.n)
    engine_path: str = "packed"  # "packed" | "packed_bucketed" | "unpacked" (capability.py)
    queue_s: float = 0.0  # hand-over to the start of this prompt's prefill (waiting for a slot)


class StopChecker:
    """EOS ids, stop token ids and stop strings, none before min_tokens (vLLM's rules);
    decodes text only for sequences that have stop strings."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def check(self, tokens: list[int], params: SamplingParams) -> tuple[bool, int | None, str | int | None]:
        """-> (stopped, char offset of the stop string or None, stop reason)."""
        if len(tokens) <= params.min_tokens:
            return False, None, None
        if not params.ignore_eos and tokens[-1] in self.eos_ids:
            return True, None, None
        if tokens[-1] in params.stop_token_ids:
            return True, None, tokens[-1]
        if params.stop:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            # Only a stop string that ends after the first min_tokens tokens counts (vLLM).
            after = len(self.tokenizer.decode(tokens[:params.min_tokens], skip_special_tokens=True)) \
                if params.min_tokens else 0
            hits = [(i, s) for s in params.stop if (i := text.find(s, max(0, after - len(s) + 1))) >= 0]
            if hits:
                return True, *min(hits)
        return False, None, None


class Engine(ModelRunner):
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        super().__init__(model, tokenizer, self.config.onednn_linear)
        # Switches an sdpa model to prepack_varlen (sdpa for every call but packed prefill).
        self.varlen = self.config.varlen and self.capability.route != UNPACKED and enable_varlen(model)
        self.block_size = self.config.block_size or (FLASH_PAGE if self.device.type == "cuda" else BLOCK_SIZE)
        self.keys_read = self.keys_real = 0  # keys attended per decode step, summed: read (padding too) / real
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.stops = StopChecker(tokenizer, set(eos) | {tokenizer.eos_token_id} - {None})
        self.block_decode = self.config.block_decode and self.varlen
        self.decode_refusal = self.probe_block_decode() if self.block_decode else None
        if self.decode_refusal:  # e.g. keys/values changed between cache and attention (DiffLlama)
            self.block_decode = False
            warnings.warn(f"prepack: {type(model).__name__} decodes on the left-padded cache: {self.decode_refusal}",
                          stacklevel=2)

    @on_kernels
    def probe_block_decode(self) -> str | None:
        return block_decode_refusal(self.model, self.block_size, self.pad_id)

    def encode(self, prompts: Sequence[Prompt], reserve: int | Sequence[int] = 0) -> list[list[int]]:
        """Token ids per prompt; raises PromptError naming the first bad prompt."""
        return encode_prompts(self.tokenizer, prompts, self.max_context, reserve)

    def groups(self, lengths: list[int]) -> list[list[int]]:
        """Split prompt indices into groups under the prompt-count and token budgets."""
        return self.config.groups(lengths, self.config.sort_by_length)

    def pack(self, ids: list[list[int]]):
        """One stream [1, T] on the varlen path; rows of pack_capacity on the dense-mask path."""
        return pack(ids, self.config.pack_capacity, self.pad_id, stream=self.varlen)

    @torch.inference_mode()
    @on_kernels
    def prefill(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Next-token logits after each prompt, [P, V] fp32, in input order."""
        ids = self.encode(prompts)
        if self.capability.route != PACKED:  # bucketed or unpacked (capability.py)
            return routes.prefill(self, ids)
        return self.prefill_packed(ids)

    @torch.inference_mode()
    @on_kernels
    def prefill_packed(self, ids: list[list[int]]) -> torch.Tensor:
        """Encoded prompts on the packed path (routes.py calls it per bucket): logits [P, V] fp32."""
        out = torch.empty(len(ids), self.model.config.vocab_size)
        for g in self.groups([len(x) for x in ids]):
            packed = self.pack([ids[i] for i in g])
            logits, _ = last_token_logits(self.model, packed, varlen=self.varlen)
            out[torch.tensor(g)] = logits.cpu()
        return out

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """One result per prompt, in input order. Prompts are str or lists of token ids."""
        start = self.now()
        params = _per_prompt(sampling, len(prompts))
        return self.generate_ids(self.encode(prompts, reserve=[p.max_new_tokens for p in params]), params, start)

    def generate_ids(self, ids: list[list[int]], params: list[SamplingParams],
                     start: float | None = None) -> list[GenerationResult]:
        """generate() for encoded prompts (the job's actor call); start: the hand-over time."""
        if self.capability.route != PACKED:  # bucketed or unpacked (capability.py, routes.py)
            return routes.generate(self, ids, params)
        return self.generate_packed(ids, params, start)

    @torch.inference_mode()
    @on_kernels
    def generate_packed(self, ids: list[list[int]], params: list[SamplingParams],
                        start: float | None = None) -> list[GenerationResult]:
        """Encoded prompts on the packed path (routes.py calls it per bucket)."""
        start = self.now() if start is None else start
        self.keys_read = self.keys_real = 0
        if not self.block_decode:
            return self.generate_groups(ids, params, start)
        c = self.config
        run = Run(Scheduler([len(x) for x in ids], params, c.max_num_seqs, c.max_group_prompts,
                            c.max_group_tokens, c.sort_by_length),
                  Batch(BlockCache(self.model.config.num_hidden_layers, self.block_size)))
        while not run.finished:
            if admitted := run.scheduler.admit(run.batch.size):
                self.join(run, admitted, [ids[i] for i in admitted])
            self.step(run)
        self.keys_read, self.keys_real = run.batch.cache.keys_read, run.batch.cache.keys_real
        return [self.result(ids[p], run.admission[p], run.done[p], start) for p in range(len(ids))]

    def join(self, run: Run, admitted: list[int], ids: list[list[int]]) -> None:
        """Prefill the admitted prompts in one packed pass; their sequences join the running batch."""
        adm = Admission(self.now())
        packed = self.pack(ids)
        t_packed = self.now()
        logits, cache = last_token_logits(self.model, packed, varlen=True)  # [P, V]
        t_prefilled = self.now()
        params = [run.scheduler.params[p] for p in admitted]
        seqs, prompt_of = expand(params)
        index = torch.tensor(prompt_of) if len(seqs) > len(params) else None  # [S] prompt of each sequence
        run.batch.cache.add(cache, packed, [len(ids[i]) + seqs[s].max_new_tokens for s, i in enumerate(prompt_of)],
                            index)
        sampler = Sampler(seqs, self.device, [ids[i] for i in prompt_of], self.stops.eos_ids)
        first = sampler(logits if index is None else logits[index.to(logits.device)])
        finisher = Finisher(seqs, self.stops.eos_ids, self.device)
        codes = finisher.check(first.tokens)
        count = [0] * len(admitted)
        new = []
        for s, i in enumerate(prompt_of):
            new.append(Seq(admitted[i], count[i], seqs[s], logprobs=[] if seqs[s].logprobs is not None else None))
            count[i] += 1
        lengths = packed.length if index is None else packed.length[index]
        run.batch.join(new, sampler, finisher, first.tokens, lengths.to(first.tokens.device))
        adm.first = self.now()
        adm.prefill_s, adm.overhead_s = t_prefilled - t_packed, (t_packed - adm.start) + (adm.first - t_prefilled)
        adm.pack_prompts, adm.pack_rows, adm.pack_efficiency = len(ids), packed.num_rows, packed.efficiency
        for p in admitted:
            run.admission[p] = adm
        run.retire(first, codes, range(run.batch.size - len(new), run.batch.size), self.stops, self.now())

    def step(self, run: Run) -> None:
        """One decode step for every running sequence; the finished ones leave."""
        b = run.batch
        if not b.seqs:
            return
        logits = block_step(self.model, b.cache, b.last, b.positions)
        step = b.sampler(logits)
        b.last, b.positions = step.tokens, b.positions + 1
        run.retire(step, b.finisher.check(step.tokens), range(b.size), self.stops, self.now())

    def result(self, ids: list[int], adm: Admission, done: list, start: float) -> GenerationResult:
        outputs = [self.completion(i, d) for i, d in sorted(done, key=lambda x: x[0])]
        c, last = outputs[0], max(d.finished_at for _, d in done)
        return GenerationResult(
            text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason, num_input_tokens=len(ids),
            num_generated_tokens=sum(len(o.token_ids) for o in outputs), prefill_s=adm.prefill_s,
            ttft_s=adm.first - start, decode_s=max(0.0, last - adm.first), overhead_s=adm.overhead_s,
            pack_prompts=adm.pack_prompts, pack_rows=adm.pack_rows, pack_efficiency=adm.pack_efficiency,
            stop_reason=c.stop_reason, logprobs=c.logprobs, outputs=outputs, queue_s=adm.start - start)

    def generate_groups(self, ids: list[list[int]], params: list[SamplingParams], start: float) -> list[GenerationResult]:
        """The left-padded reference: static groups, each decoded until its last prompt finishes."""
        results: list[GenerationResult | None] = [None] * len(ids)
        for g in self.groups([len(x) for x in ids]):
            for i, r in zip(g, self.generate_group([ids[i] for i in g], [params[i] for i in g], start)):
                results[i] = r
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    @on_kernels
    def generate_group(self, ids: list[list[int]], params: list[SamplingParams],
                       start: float | None = None) -> list[GenerationResult]:
        """Pack, prefill, unpack, decode one group of encoded prompts (start: hand-over time).

        A prompt with n > 1 is prefilled once; its cache row is copied for its n sequences."""
        t0 = self.now()
        start = t0 if start is None else start
        packed = self.pack(ids)
        t_packed = self.now()
        logits, cache = last_token_logits(self.model, packed, varlen=self.varlen)  # [P, V]
        t_prefilled = self.now()
        seqs, prompt_of = expand(params)  # one SamplingParams per sequence
        index = torch.tensor(prompt_of) if len(seqs) > len(params) else None  # [S] prompt of each sequence
        cache, attention_mask = kv_cache.unpack(cache, packed, room=max(p.max_new_tokens for p in params) - 1,
                                                index=index)
        sampler = Sampler(seqs, self.device, [ids[p] for p in prompt_of], self.stops.eos_ids)
        first = sampler(logits if index is None else logits[index.to(logits.device)])
        t_first = self.now()
        lengths = packed.length if index is None else packed.length[index]
        keys = [0, 0]
        decoded = decode(self.model, cache, attention_mask, lengths, first, sampler, seqs,
                         lambda s, tokens: self.stops.check(tokens, seqs[s]), self.sync, keys)
        self.keys_read, self.keys_real = self.keys_read + keys[0], self.keys_real + keys[1]
        overhead = (t_packed - t0) + (t_first - t_prefilled)
        by_prompt: list[list[Completion]] = [[] for _ in ids]
        finished = [t_first] * len(ids)
        for s, (p, d) in enumerate(zip(prompt_of, decoded)):
            by_prompt[p].append(self.completion(len(by_prompt[p]), d))
            finished[p] = max(finished[p], d.finished_at)
        out = []
        for p, outputs in enumerate(by_prompt):
            c = outputs[0]
            out.append(GenerationResult(
                text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason,
                num_input_tokens=len(ids[p]), num_generated_tokens=sum(len(o.token_ids) for o in outputs),
                prefill_s=t_prefilled - t_packed, ttft_s=t_first - start, queue_s=t0 - start,
                decode_s=max(0.0, finished[p] - t_first), overhead_s=overhead,
                pack_prompts=len(ids), pack_rows=packed.num_rows, pack_efficiency=packed.efficiency,
                stop_reason=c.stop_reason, logprobs=c.logprobs, outputs=outputs))
        return out

    def completion(self, index: int, d) -> Completion:
        """A decoded sequence -> its Completion: text without the stop token (vLLM) or stop string."""
        tokens = d.token_ids
        if d.finish_reason == "stop" and d.stop_at is None:  # ended by EOS or a stop token id
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if d.stop_at is not None:
            text = text[: d.stop_at]
        return Completion(index, text, d.token_ids, d.finish_reason, d.stop_reason, d.logprobs)


def _per_prompt(sampling, n: int) -> list[SamplingParams]:
    if sampling is None:
        return [SamplingParams()] * n
    if isinstance(sampling, SamplingParams):
        return [sampling] * n
    sampling = list(sampling)
    if len(sampling) != n:
        raise ValueError(f"got {len(sampling)} SamplingParams for {n} prompts")
    return sampling
