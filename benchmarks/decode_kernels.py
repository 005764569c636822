"""Decode attention kernels on CPU, one layer, one step: the numbers behind docs/decode.md.

    PYTHONPATH=$PWD python benchmarks/decode_kernels.py [--batch 64] [--lo 50] [--hi 600]

Shapes of the 70M Llama (12 heads, 4 KV heads, head dim 64), fp32, one thread. Rows get
key counts drawn from [lo, hi]; the left-padded reference pads every row to the longest.
"""
import argparse
import random
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from prepack_actor.core import block_attention
from prepack_actor.core.block_cache import BlockCache


def best(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lo", type=int, default=50)
    ap.add_argument("--hi", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    b, h, hkv, d = args.batch, 12, 4, 64
    lengths = [rng.randint(args.lo, args.hi) for _ in range(b)]
    q = torch.randn(b, h, 1, d)
    module = SimpleNamespace(layer_idx=0)
    for bs in (8, 16, 32):
        cache = BlockCache(1, bs)
        runs = [-(-(n + 1) // bs) for n in lengths]
        layer = cache.layers[0]
        layer.keys, layer.values = torch.randn(sum(runs), bs, hkv, d), torch.randn(sum(runs), bs, hkv, d)
        starts = [sum(runs[:i]) for i in range(b)]
        cache.runs, cache.lengths = list(zip(starts, runs)), list(lengths)
        for kernel in block_attention.CPU:
            cache.kernel = kernel
            cache.plans = {}
            t_plan = best(lambda: (cache.plans.clear(), block_attention.plan(cache, None, kernel)))
            t = best(lambda: block_attention.attend(module, q, None, None, cache, d ** -0.5, None))
            p = cache.plans[None]
            print(f"block {bs:2d} {kernel:6s}: {t * 1e3:6.2f} ms/layer (plan {t_plan * 1e3:.2f} ms/step), "
                  f"keys read / real {p.read / p.real:.3f}")
    lmax = max(lengths) + 1
    k, v = torch.randn(b, hkv, lmax, d), torch.randn(b, hkv, lmax, d)
    mask = (torch.arange(lmax)[None] >= (lmax - 1 - torch.tensor(lengths))[:, None])[:, None, None]
    t = best(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    print(f"left-padded sdpa : {t * 1e3:6.2f} ms/layer, keys read / real {b * lmax / sum(n + 1 for n in lengths):.3f}")


if __name__ == "__main__":
    main()
