"""BlockCache and block_attention: keys land where the packed prefill had them, runs are
reused without copies, and the CPU kernels equal plain attention over each row's keys."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from prepack_actor.core import block_attention, cpu_ops
from prepack_actor.core.block_cache import BlockCache
from prepack_actor.core.packing import pack


def packed_cache(lengths, hkv=2, d=8, layers=2):
    batch = pack([[1] * n for n in lengths], capacity=max(lengths) + 3)  # several rows with pad runs
    cache = DynamicCache()
    for i in range(layers):
        k = torch.randn(batch.num_rows, hkv, batch.width, d)
        cache.update(k, k + 100, i)
    return batch, cache, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def test_add_copies_each_prompt_into_its_run_and_finished_runs_are_reused():
    batch, cache, ref = packed_cache([5, 11, 3, 7])
    c = BlockCache(2, block_size=4)
    c.add(cache, batch, reserve=[9, 11, 20, 7])
    assert [n for _, n in c.runs] == [3, 3, 5, 2] and c.lengths == [5, 11, 3, 7]
    for b in range(4):
        first, row, off, n = c.runs[b][0] * 4, int(batch.row[b]), int(batch.offset[b]), int(batch.length[b])
        for layer, (k, v) in zip(c.layers, ref):
            fk, fv = layer.flat()
            torch.testing.assert_close(fk[first:first + n], k[row, :, off:off + n].transpose(0, 1), atol=0, rtol=0)
            torch.testing.assert_close(fv[first:first + n], v[row, :, off:off + n].transpose(0, 1), atol=0, rtol=0)
    blocks = c.num_blocks
    freed = c.runs[2]
    c.select([0, 1, 3])  # row 2 finished: its run is free again, nothing moved
    assert c.lengths == [5, 11, 7] and c.free[0] == freed
    batch2, cache2, _ = packed_cache([6])
    c.add(cache2, batch2, reserve=[18])
    assert c.runs[-1] == freed and c.num_blocks == blocks  # the freed run, no growth
    c.select([])
    assert c.free == [(0, blocks)]  # every run merged back into one


def test_pools_start_at_the_expected_peak_and_grow_keeping_every_row():
    batch, cache, ref = packed_cache([5, 11])
    c = BlockCache(2, block_size=4, expect_blocks=8)
    c.add(cache, batch, reserve=[8, 12])
    assert c.num_blocks == 8 and c.free == [(5, 3)]  # the expected 8 blocks, allocated once
    assert c.lengths == [5, 11]
    before = [tuple(t.clone() for t in layer.flat()) for layer in c.layers]
    batch2, cache2, _ = packed_cache([6])
    c.add(cache2, batch2, reserve=[40])  # 10 blocks > the 3 free: the pools grow (copied)
    assert c.num_blocks >= 15 and c.runs[-1][1] == 10
    for (k0, v0), layer in zip(before, c.layers):  # the rows already there kept their keys and values
        k, v = layer.flat()
        for (first, _), n in zip(c.runs[:2], c.lengths[:2]):
            # the written slots only: a run's reserved tail is torch.empty, whose garbage may be NaN (NaN != NaN)
            sl = slice(first * 4, first * 4 + n)
            assert torch.equal(k[sl], k0[sl]) and torch.equal(v[sl], v0[sl])


@pytest.mark.parametrize("kernel", block_attention.CPU)
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_kernels_equal_attention_over_each_rows_keys(kernel, window, dtype, head_dim):
    torch.manual_seed(0)
    lengths = [1, 9, 4, 17, 9, 40]  # 41 keys: the fused kernel's blocks of 16 keys, a partial one last
    d = head_dim
    c = BlockCache(1, block_size=4)
    layer = c.layers[0]
    runs = [-(-(n + 1) // 4) for n in lengths]
    layer.keys = torch.randn(sum(runs) + 3, 4, 2, d, dtype=dtype) * 3  # a peaked softmax
    layer.values = torch.randn(sum(runs) + 3, 4, 2, d, dtype=dtype)
    c.runs = [(3 + sum(runs[:i]), r) for i, r in enumerate(runs)]  # not starting at slot 0
    c.lengths = list(lengths)
    c.kernel = kernel
    q = torch.randn(len(lengths), 6, 1, d, dtype=dtype)  # GQA 6 / 2
    if kernel == "fused":  # head dim 8 is the loop's (not a multiple of 16); 64 must run the C++ kernel here
        assert (cpu_ops.attention_refusal(q, layer.keys) is None) == (d == 64), cpu_ops.attention_refusal(q, layer.keys)
    out = block_attention.attend(SimpleNamespace(layer_idx=0), q, None, None, c, d ** -0.5, window)  # [B, 1, H, D]
    k, v = layer.flat()
    for b, ((first, _), n) in enumerate(zip(c.runs, lengths)):
        s, e = first * 4, first * 4 + n + 1  # the step's new token included
        s = max(s, e - window) if window else s
        ref = F.scaled_dot_product_attention(q[b:b + 1].float(), k[s:e].transpose(0, 1)[None].float(),
                                             v[s:e].transpose(0, 1)[None].float(), enable_gqa=True)  # fp32 reference
        assert out.dtype == dtype
        # bf16: the loop rounds its softmax weights to bf16 before the second matmul (as HF's
        # eager attention); the C++ kernel keeps them in fp32 and rounds the output once
        bf16_tol = 1e-2 if kernel == "fused" and d == 64 else 3e-2
        torch.testing.assert_close(out[b].float(), ref[0].transpose(0, 1),
                                   atol=1e-5 if dtype == torch.float32 else bf16_tol, rtol=0)
    assert c.keys_real == sum(min(n + 1, window or n + 1) for n in lengths)
    assert c.keys_read <= block_attention.TOLERANCE * c.keys_real


def test_a_step_whose_attention_never_read_the_blocks_is_refused():
    batch, cache, _ = packed_cache([5, 3])
    c = BlockCache(2, block_size=4)
    c.add(cache, batch, reserve=[8, 8])
    c.prepare()
    with torch.inference_mode():
        for layer in c.layers:  # what a model bypassing the attention interface does: writes, never reads
            layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    with pytest.raises(RuntimeError, match="block_decode"):
        c.advance()


def test_without_a_compiler_the_fused_kernel_falls_back_to_the_loop(tmp_path):
    """No C++ compiler (an empty PATH, a fresh extensions dir): one warning, then the loop's numbers."""
    script = """
import warnings
from types import SimpleNamespace
import torch
from prepack_actor.core import block_attention, cpu_ops
from prepack_actor.core.block_cache import BlockCache
torch.manual_seed(0)
c = BlockCache(1, block_size=4)
c.layers[0].keys, c.layers[0].values = torch.randn(12, 4, 2, 64), torch.randn(12, 4, 2, 64)
c.runs, c.lengths = [(0, 5), (5, 7)], [17, 20]
q = torch.randn(2, 6, 1, 64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = []
    for kernel in ("fused", "fused", "loop"):
        c.kernel, c.plans = kernel, {}
        outs.append(block_attention.attend(SimpleNamespace(layer_idx=0), q, None, None, c, 0.125, None))
assert cpu_ops.ops() is None and "could not be built" in cpu_ops.attention_refusal(q, c.layers[0].keys)
assert sum("C++ CPU kernels could not be built" in str(w.message) for w in caught) == 1
assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])
print("fell back")
"""
    env = {**os.environ, "PATH": str(tmp_path / "nothing"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "fell back" in run.stdout, run.stderr[-3000:]


def test_the_fused_kernel_gives_the_same_bits_on_any_number_of_threads():
    """Rows are split over torch's threads (at::parallel_for); each row is one thread's, in one order."""
    torch.manual_seed(0)
    c = BlockCache(1, block_size=4)
    c.layers[0].keys, c.layers[0].values = torch.randn(40, 4, 2, 32), torch.randn(40, 4, 2, 32)
    c.runs, c.lengths = [(0, 10), (10, 6), (16, 24)], [37, 20, 90]
    q = torch.randn(3, 4, 1, 32)
    assert cpu_ops.attention_refusal(q, c.layers[0].keys) is None
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            c.plans = {}
            outs.append(block_attention.attend(SimpleNamespace(layer_idx=0), q, None, None, c, 32 ** -0.5, None))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
