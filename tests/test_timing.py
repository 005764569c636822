"""timing.compare_prefill: both methods over the same batches, slots counted right."""
from __future__ import annotations

from prepack_actor import load_model
from prepack_actor.bench.baselines import random_batches
from prepack_actor.core.packing import pack
from prepack_actor.bench.timing import METHODS, compare_prefill


def test_compare_prefill_counts_tokens_and_slots(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir("llama"), device="cpu")
    prompts = [[5 + (i * j) % 50 for j in range(3 + 4 * i % 17)] for i in range(10)]
    rows = compare_prefill(model, prompts, pad_id=0, batch_size=4, repeats=2, seed=3)
    assert [r.method for r in rows] == list(METHODS)
    batches = [[prompts[i] for i in b] for b in random_batches(len(prompts), 4, 3)]
    full, packed = rows
    assert full.num_slots == sum(len(b) * max(map(len, b)) for b in batches)
    assert packed.num_slots == sum(pack(b).input_ids.numel() for b in batches)
    for r in rows:
        assert r.num_tokens == sum(map(len, prompts)) and r.num_batches == 3
        assert len(r.runs_s) == 2 and min(r.runs_s) <= r.median_s <= max(r.runs_s) and r.median_s > 0
    assert full.num_slots >= packed.num_slots >= packed.num_tokens
    assert full.rows_per_batch == 10 / 3 and packed.rows_per_batch <= full.rows_per_batch
