"""A paged K/V cache of fixed-size blocks: each sequence holds only its real tokens.

    cache = BlockCache(model.config.num_hidden_layers, block_size=8)
    cache.add(packed_cache, packed, reserve, index)  # straight from the packed prefill, no left pad
    cache.prepare()                          # per step: a slot for each new token
    with attention.decoding(cache):          # prepack_varlen reads the blocks (block_attention)
        model(input_ids=last[:, None], position_ids=pos[:, None], past_key_values=cache)
    cache.advance(); cache.select(keep)      # finished sequences free their blocks: no copy

Layout per layer: keys and values in a pool [num_blocks, block_size, Hkv, D] (the paged
layout of torch's `varlen_attn(block_table=...)`). A sequence owns a run of consecutive
blocks reserved when it joins, for its prompt and its max_new_tokens, so its keys are one
contiguous slot range: the CPU kernel attends over views, with no gather (docs/decode.md:
gathering scattered blocks cost more than the attention itself). Leaving or joining the
batch moves block ids, never keys; freed runs merge with their free neighbours. A sequence
sampled n times gets its own copy of its prompt's blocks.

The model sees an empty cache (get_seq_length() == 0, mask sizes 1 x 1), so transformers
builds no mask; lengths, windows and positions live here and in the position ids.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .compile import opaque
from .packing import PackedBatch

BLOCK_SIZE = 8  # tokens per block (docs/decode.md: 8 vs 16/32 on CPU)



class BlockDecodeUnsupported(RuntimeError):
    """The model's attention does not read the block cache as stored (Engine falls back to left-padded decode)."""

class BlockLayer(CacheLayerMixin):
    """One layer's pools; `update` writes the step's new keys at the cache's write slots."""

    is_sliding = False

    def __init__(self, cache: "BlockCache"):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a BlockLayer is filled by BlockCache.add, never lazily")

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pools as [num_blocks * block_size, Hkv, D] views (one row per token slot)."""
        return self.keys.flatten(0, 1), self.values.flatten(0, 1)

    def update(self, key_states, value_states, *args, **kwargs):
        """key/value_states [B, Hkv, 1, D] -> written at cache.write_slots [B]; returned as given."""
        assert key_states.shape[-2] == 1, "the block cache decodes one token per sequence per step"
        k, v = self.flat()
        slots = self.cache.write_slots
        self.cache.writes += 1
        k.index_copy_(0, slots, key_states[:, :, 0].to(k.dtype))
        v.index_copy_(0, slots, value_states[:, :, 0].to(v.dtype))
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # no mask is built: block_attention owns lengths and windows

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


KERNEL = "fused"  # the CPU decode kernel of new caches (block_attention.CPU; benchmarks switch it)


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks a reserve of `tokens` tokens takes."""
    return -(-tokens // block_size)


class BlockCache(Cache):
    """The running batch's blocks: runs[b] and lengths[b] for batch row b."""

    def __init__(self, num_layers: int, block_size: int = BLOCK_SIZE, expect_blocks: int = 0):
        """expect_blocks: the blocks the running batch is expected to reserve at its peak; the
        pools start that large, so they need not grow (each growth copies every pool)."""
        self.block_size, self.expect_blocks = block_size, expect_blocks
        super().__init__(layers=[BlockLayer(self) for _ in range(num_layers)])
        self.runs: list[tuple[int, int]] = []  # per batch row: (first block, blocks) of its reserve
        self.lengths: list[int] = []  # per batch row: tokens in cache
        self.free: list[tuple[int, int]] = []  # free runs (first block, blocks), sorted
        self.num_blocks = 0
        self.write_slots: torch.Tensor | None = None  # [B] slot of each row's new token this step
        self.plans: dict = {}  # window -> read plan of this step (block_attention)
        self.kernel = KERNEL  # CPU kernel (block_attention.CPU)
        self.head_orders: dict = {}  # layer -> query-head order for its kv heads (block_attention.head_order)
        self.writes = self.reads = 0  # layer updates / block attention calls this step (must match)
        self.keys_read = self.keys_real = 0  # keys attended, summed over steps (and windows): read (padding too) / real

    # Index bookkeeping on Python objects: eager inside compiled layers (core/compile.py).
    update = opaque(Cache.update)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def _alloc(self, n: int) -> int:
        """First block of a free run of n blocks (first fit); the pools grow if none fits."""
        for i, (first, count) in enumerate(self.free):
            if count >= n:
                self.free[i:i + 1] = [(first + n, count - n)] if count > n else []
                return first
        self._grow(max(n, self.num_blocks))
        return self._alloc(n)

    def _grow(self, n: int) -> None:
        """n more blocks in every pool (one copy of the pools; callers at least double them)."""
        for layer in self.layers:
            layer.keys, layer.values = (torch.cat([t, t.new_empty(n, *t.shape[1:])]) for t in (layer.keys, layer.values))
        self._release(self.num_blocks, n)
        self.num_blocks += n

    def _release(self, first: int, count: int) -> None:
        """Return blocks [first, first + count) to the free runs, merged with adjacent ones."""
        runs = sorted(self.free + [(first, count)])
        merged = [runs[0]]
        for f, c in runs[1:]:
            if merged[-1][0] + merged[-1][1] == f:
                merged[-1] = (merged[-1][0], merged[-1][1] + c)
            else:
                merged.append((f, c))
        self.free = merged

    @torch.inference_mode()
    def add(self, cache, packed: PackedBatch, reserve: list[int], index: torch.Tensor | None = None) -> None:
        """Append one sequence per prompt of a packed prefill (or per entry of `index` [S], the
        prompt of each sequence) to the batch, each with room for reserve[s] tokens in all.
        cache: the prefill's cache, [R, Hkv, W, D] per layer (freed layer by layer as copied)."""
        length, row, offset = packed.length, packed.row, packed.offset  # [P]
        if index is not None:
            length, row, offset = length[index], row[index], offset[index]  # [S]
        assert len(reserve) == len(length) and all(r >= n for r, n in zip(reserve, length.tolist()))
        bs = self.block_size
        first = cache.layers[0].keys
        blocks = [blocks_for(r, bs) for r in reserve]
        if not self.num_blocks:  # pools created at the first add: dtype, heads and head dim known
            n = max(self.expect_blocks, sum(blocks))
            for layer, src in zip(self.layers, cache.layers):
                shape = (n, bs, src.keys.shape[1], src.keys.shape[3])
                layer.keys, layer.values = first.new_empty(shape), first.new_empty(shape[:3] + (src.values.shape[3],))
                layer.dtype, layer.device, layer.is_initialized = first.dtype, first.device, True
            self.num_blocks, self.free = n, [(0, n)]
        short = sum(blocks) - sum(c for _, c in self.free)
        if short > 0:  # one growth for the whole admission, not one per sequence
            self._grow(max(short, self.num_blocks))
        runs = [(self._alloc(n), n) for n in blocks]
        # Source slots in the packed [R * W] rows and destination slots in the pools, token by token.
        seq = torch.repeat_interleave(torch.arange(len(length)), length)  # [N] sequence of each token
        pos = torch.arange(len(seq)) - (torch.cumsum(length, 0) - length)[seq]  # [N] position in its sequence
        src = row[seq] * packed.width + offset[seq] + pos
        dst = torch.tensor([f * bs for f, _ in runs], dtype=torch.long)[seq] + pos
        src, dst = src.to(first.device), dst.to(first.device)
        for layer, packed_layer in zip(self.layers, cache.layers):
            for pool, t in zip(layer.flat(), (packed_layer.keys, packed_layer.values)):
                r, h, w, d = t.shape
                pool.index_copy_(0, dst, t.transpose(1, 2).reshape(r * w, h, d).index_select(0, src))
            packed_layer.keys = packed_layer.values = None
        self.runs.extend(runs)
        self.lengths.extend(length.tolist())

    def select(self, keep: list[int]) -> None:
        """Keep batch rows `keep` (in that order); the others' blocks go back to the free runs."""
        kept = set(keep)
        for b, run in enumerate(self.runs):
            if b not in kept:
                self._release(*run)
        self.runs = [self.runs[b] for b in keep]
        self.lengths = [self.lengths[b] for b in keep]

    def prepare(self) -> None:
        """Before a decode step: the slot of each row's new token; read plans reset."""
        bs = self.block_size
        assert all(n < c * bs for n, (_, c) in zip(self.lengths, self.runs)), "a sequence outgrew its reserve"
        self.write_slots = torch.tensor([f * bs + n for n, (f, _) in zip(self.lengths, self.runs)],
                                        device=self.layers[0].keys.device)
        self.plans = {}
        self.writes = self.reads = 0

    def advance(self) -> None:
        """After a decode step: every row holds one more token."""
        if self.reads != self.writes:  # a model bypassing the attention interface would attend to one key
            raise BlockDecodeUnsupported(f"{self.writes} layers wrote to the block cache but {self.reads} read it: the model "
                               "does not call prepack_varlen for attention (block_decode); use EngineConfig(block_decode=False)")
        self.lengths = [n + 1 for n in self.lengths]

    def ranges(self, window: int | None) -> list[tuple[int, int]]:
        """This step's keys of each row as a slot range [start, end), the new token included;
        a window keeps the last `window` of them."""
        bs = self.block_size
        ends = [f * bs + n + 1 for n, (f, _) in zip(self.lengths, self.runs)]
        return [(max(e - window, f * bs) if window else f * bs, e) for e, (f, _) in zip(ends, self.runs)]

    def table_tensor(self) -> torch.Tensor:
        """[B, max blocks] int32 block ids (0-padded), on the pools' device."""
        width = max(c for _, c in self.runs)
        return torch.tensor([list(range(f, f + c)) + [0] * (width - c) for f, c in self.runs], dtype=torch.int32,
                            device=self.layers[0].keys.device)
