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

import heapq
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from . import routes
from .capability import PACKED, UNPACKED
from .core import kv_cache
from .core.block_attention import FLASH_PAGE
from .core.block_cache import BLOCK_SIZE, BlockCache, blocks_for
from .core.decode import block_decode_refusal, block_step, decode
from .core.finish import Finisher
from .core.forward import enable_varlen, last_token_logits
from .core.grouping import GroupConfig
from .core.packing import pack
from .core.sampling import Sampler, SamplingParams, expand
from .inputs import Prompt, encode_prompts
from .models import ModelRunner, on_kernels
from .outputs import Admission, Completion, GenerationResult, StopChecker, StopText, generation_result  # noqa: F401 (API)
from .scheduler import Batch, Run, Scheduler, Seq

CPU_MAX_NUM_SEQS = 256  # EngineConfig.max_num_seqs=None on CPU: vLLM's LLM-class default there
ACCELERATOR_MAX_NUM_SEQS = 128  # ... on CUDA and other devices, where the block cache shares scarcer memory


@dataclass
class EngineConfig(GroupConfig):
    sort_by_length: bool = True  # group similar lengths (fuller packs, similar decode lengths)
    # Prefill on varlen attention, one stream per group, where the model allows it
    # (forward.varlen_refusal); False = the dense-mask rows of pack_capacity (the reference).
    varlen: bool = True
    # CPU: linear layers on oneDNN with prepacked weights (core/linear.py; 10-15% faster
    # prefill here, at the cost of a second copy of the weights), gated MLPs' prefill passes on
    # MKL on Intel CPUs (linear.MKL_MLP); False = torch's F.linear.
    onednn_linear: bool = True
    # Decoder layers compiled by inductor (core/compile.py; up to 13% faster CPU prefill here);
    # the first calls compile for 10-25 s and need a C++ compiler (else a warning, then eager).
    compile: bool = False
    # Decode from a block cache of real keys only, prompts admitted as others finish
    # (needs varlen); False = static groups from a left-padded cache (the reference).
    block_decode: bool = True
    # Sequences decoding at once (block decode), >= 1; None = 256 on CPU (vLLM's LLM-class
    # default there; 1-5% faster than 128 here, docs/decode.md), 128 on accelerators (memory).
    max_num_seqs: int | None = None
    block_size: int | None = None  # tokens per cache block, >= 1; None = 8 on CPU, 256 on CUDA (paged flash)

    def __post_init__(self):
        super().__post_init__()
        for key in ("max_num_seqs", "block_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{key} must be an int >= 1 or None, got {value!r}")


class Engine(ModelRunner):
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        super().__init__(model, tokenizer, self.config.onednn_linear, self.config.compile)
        # Switches an sdpa model to prepack_varlen (sdpa for every call but packed prefill).
        self.varlen = self.config.varlen and self.capability.route != UNPACKED and enable_varlen(model)
        self.block_size = self.config.block_size or (FLASH_PAGE if self.device.type == "cuda" else BLOCK_SIZE)
        self.max_num_seqs = self.config.max_num_seqs or (
            CPU_MAX_NUM_SEQS if self.device.type == "cpu" else ACCELERATOR_MAX_NUM_SEQS)
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

    def warm_up(self) -> None:
        if self.compile:  # prefills and decode steps of two sequences and of one: dynamo
            pad = self.pad_id  # compiles a dimension of size 1 apart
            params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (2, 4)]
            self.generate_ids([[pad] * 5, [pad] * 3], params)
            self.generate_ids([[pad] * 4], params[:1])

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
        run = self.new_run([len(x) for x in ids], params)
        while not run.finished:
            self.advance(run, ids)
        self.keys_read, self.keys_real = run.batch.cache.keys_read, run.batch.cache.keys_real
        return [self.result(ids[p], run.admission[p], run.done[p], start) for p in range(len(ids))]

    def new_run(self, lengths: list[int], params: list[SamplingParams]) -> Run:
        """A scheduler with these prompts waiting and an empty running batch (block decode)."""
        c, bs = self.config, self.block_size
        # The pools' size at the batch's peak: the max_num_seqs largest reserves (prompt + new
        # tokens, per sequence), so they are allocated once instead of growing by copies.
        blocks = (blocks_for(n + p.max_new_tokens, bs) for n, p in zip(lengths, params) for _ in range(p.n))
        peak = sum(heapq.nlargest(self.max_num_seqs, blocks))
        return Run(Scheduler(lengths, params, self.max_num_seqs, c.max_group_prompts, c.max_group_tokens, c.sort_by_length),
                   Batch(BlockCache(self.model.config.num_hidden_layers, bs, expect_blocks=peak)))

    def advance(self, run: Run, ids) -> None:
        """One turn of the main loop: admit waiting prompts (one packed prefill), one decode step.
        ids[p]: prompt p's token ids (a list, or engine_loop's dict over many calls)."""
        if admitted := run.scheduler.admit(run.batch.size):
            self.join(run, admitted, [ids[i] for i in admitted])
        self.step(run)

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
        """A prompt's result from its finished sequences ((index, Decoded), in any order)."""
        return generation_result(self.tokenizer, len(ids), [d for _, d in sorted(done, key=lambda x: x[0])],
                                 adm, start)

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
        keys, texts = [0, 0], [StopText() for _ in seqs]
        decoded = decode(self.model, cache, attention_mask, lengths, first, sampler, seqs,
                         lambda s, tokens: self.stops.check(tokens, seqs[s], texts[s]), self.sync, keys)
        self.keys_read, self.keys_real = self.keys_read + keys[0], self.keys_real + keys[1]
        adm = Admission(t0, prefill_s=t_prefilled - t_packed, first=t_first,
                        overhead_s=(t_packed - t0) + (t_first - t_prefilled), pack_prompts=len(ids),
                        pack_rows=packed.num_rows, pack_efficiency=packed.efficiency)
        by_prompt: list[list] = [[] for _ in ids]
        for p, d in zip(prompt_of, decoded):
            by_prompt[p].append((len(by_prompt[p]), d))
        return [self.result(ids[p], adm, done, start) for p, done in enumerate(by_prompt)]


def _per_prompt(sampling, n: int) -> list[SamplingParams]:
    if sampling is None:
        return [SamplingParams()] * n
    if isinstance(sampling, SamplingParams):
        return [sampling] * n
    sampling = list(sampling)
    if len(sampling) != n:
        raise ValueError(f"got {len(sampling)} SamplingParams for {n} prompts")
    return sampling
