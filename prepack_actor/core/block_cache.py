"""A paged K/V cache of fixed-size blocks: each sequence holds only its real tokens.

    cache = BlockCache(model.config.num_hidden_layers, block_size=8)
    cache.add(packed_cache, packed, index)   # straight from the packed prefill, no left pad
    cache.prepare()                          # per step: a slot for each new token, the read plan
    model(input_ids=last[:, None], position_ids=pos[:, None], past_key_values=cache,
          block_decode=cache)                # prepack_varlen reads the blocks (block_attention)
    cache.advance(); cache.select(keep)      # finished sequences free their blocks: no copy

Layout per layer: keys and values in a pool [num_blocks, block_size, Hkv, D] (the paged
layout of torch's `varlen_attn(block_table=...)`); a sequence owns a list of blocks (its
block table) and a length. The running batch is a list of sequences; leaving or joining it
moves block ids, never keys. A sequence sampled n times gets its own copy of its prompt's
blocks (the last block is written by every copy, so sharing would need copy-on-write).

The model sees an empty cache (get_seq_length() == 0, mask sizes 1 x 1), so transformers
builds no mask; lengths, windows and positions live here and in the position ids.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .packing import PackedBatch

BLOCK_SIZE = 8  # tokens per block (docs/decode.md: 8 vs 16/32 on CPU)


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
        k.index_copy_(0, slots, key_states[:, :, 0].to(k.dtype))
        v.index_copy_(0, slots, value_states[:, :, 0].to(v.dtype))
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # no mask is built: block_attention owns lengths and windows

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class BlockCache(Cache):
    """The running batch's blocks: tables[b] and lengths[b] for batch row b (tokens in cache)."""

    def __init__(self, num_layers: int, block_size: int = BLOCK_SIZE):
        self.block_size = block_size
        super().__init__(layers=[BlockLayer(self) for _ in range(num_layers)])
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []
        self.free: list[int] = []
        self.num_blocks = 0
        self.write_slots: torch.Tensor | None = None  # [B] slot of each row's new token this step
        self.plans: dict = {}  # window -> read plan of this step (block_attention.plan)
        self.kernel = "bucket"  # CPU read kernel (block_attention.CPU)
        self.keys_read = self.keys_real = 0  # keys attended per layer call: read (padding included) / real

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def _alloc(self, n: int) -> list[int]:
        """n free block ids; the pools grow (doubling, one copy) when there are too few."""
        if len(self.free) < n:
            grow = max(n - len(self.free), self.num_blocks)
            for layer in self.layers:
                layer.keys, layer.values = (torch.cat([t, t.new_empty(grow, *t.shape[1:])]) for t in
                                            (layer.keys, layer.values))
            self.free.extend(range(self.num_blocks + grow - 1, self.num_blocks - 1, -1))
            self.num_blocks += grow
        taken = self.free[-n:] if n else []
        del self.free[len(self.free) - n:]
        return taken[::-1]

    @torch.inference_mode()
    def add(self, cache, packed: PackedBatch, index: torch.Tensor | None = None) -> None:
        """Append one sequence per prompt of a packed prefill (or per entry of `index` [S], the
        prompt of each sequence) to the batch. cache: the prefill's cache, [R, Hkv, W, D] per layer."""
        length, row, offset = packed.length, packed.row, packed.offset  # [P]
        if index is not None:
            length, row, offset = length[index], row[index], offset[index]  # [S]
        bs = self.block_size
        first = cache.layers[0].keys
        if not self.num_blocks:  # pools created at the first add: dtype, heads and head dim known
            for layer, src in zip(self.layers, cache.layers):
                shape = (0, bs, src.keys.shape[1], src.keys.shape[3])
                layer.keys, layer.values = first.new_empty(shape), first.new_empty(shape[:3] + (src.values.shape[3],))
                layer.dtype, layer.device, layer.is_initialized = first.dtype, first.device, True
        tables = [self._alloc(-(-n // bs)) for n in length.tolist()]
        # Source slots in the packed [R * W] stream and destination slots in the pools, token by token.
        tok = torch.arange(int(length.sum()))
        seq = torch.repeat_interleave(torch.arange(len(length)), length)  # [N] sequence of each token
        pos = tok - (torch.cumsum(length, 0) - length)[seq]  # [N] position in its sequence
        src = row[seq] * packed.width + offset[seq] + pos
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # [S, blocks]
        dst = table[seq, pos // bs] * bs + pos % bs
        src, dst = src.to(first.device), dst.to(first.device)
        for layer, packed_layer in zip(self.layers, cache.layers):
            for pool, t in zip(layer.flat(), (packed_layer.keys, packed_layer.values)):
                r, h, w, d = t.shape
                pool.index_copy_(0, dst, t.transpose(1, 2).reshape(r * w, h, d).index_select(0, src))
            packed_layer.keys = packed_layer.values = None  # free the packed layer as it is copied
        self.tables.extend(tables)
        self.lengths.extend(length.tolist())

    def select(self, keep: list[int]) -> None:
        """Keep batch rows `keep` (in that order); the others' blocks go back to the free list."""
        kept = set(keep)
        for b, t in enumerate(self.tables):
            if b not in kept:
                self.free.extend(t)
        self.tables = [self.tables[b] for b in keep]
        self.lengths = [self.lengths[b] for b in keep]

    def prepare(self) -> None:
        """Before a decode step: a slot for each row's new token (a new block every block_size
        tokens), and the read plans reset (built per window on first use, shared by all layers)."""
        bs = self.block_size
        slots = []
        for t, n in zip(self.tables, self.lengths):
            if n // bs == len(t):
                t.extend(self._alloc(1))
            slots.append(t[n // bs] * bs + n % bs)
        self.write_slots = torch.tensor(slots, device=self.layers[0].keys.device)
        self.plans = {}

    def advance(self) -> None:
        """After a decode step: every row holds one more token."""
        self.lengths = [n + 1 for n in self.lengths]

    def table_tensor(self) -> torch.Tensor:
        """[B, max blocks] int32 block ids (0-padded), on the pools' device."""
        width = max(len(t) for t in self.tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32,
                            device=self.layers[0].keys.device)
