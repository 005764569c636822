"""prepack_varlen: kernels equal the dense-mask reference, no W x W mask, automatic fallback.

Packed-equals-alone through the varlen path for every engine architecture (sdpa models)
is tests/test_engine.py; here the kernels, the layout and the refusals.
"""
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from prepack_actor import Engine, EngineConfig, load_model
from prepack_actor.core import attention, cpu_ops, forward, masks
from prepack_actor.core.packing import pack


def dense_attention(q, k, v, bounds, window):
    """Reference: sdpa over the whole stream with the packed block-diagonal mask. q [H, T, D]."""
    t = q.shape[1]
    seg = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds[1:]) - torch.tensor(bounds[:-1]))
    pos = torch.arange(t) - torch.tensor(bounds[:-1])[seg]
    mask = masks.packed_causal(seg[None], pos[None], sliding_window=window)[0]  # [1, T, T]
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)  # [T, H, D]


@pytest.mark.parametrize("kernel", attention.CPU_KERNELS)
@pytest.mark.parametrize("window", [None, 5, 40])
def test_cpu_kernels_equal_dense_reference(kernel, window):
    rng = random.Random(0)
    lengths = [1, 300, 7, 129, 64, 2, 200]  # around BLOCK_SIZE and the windows
    bounds = tuple([0] + torch.cumsum(torch.tensor(lengths), 0).tolist())
    t = bounds[-1]
    torch.manual_seed(rng.randrange(1000))
    q, k, v = torch.randn(6, t, 16), torch.randn(2, t, 16), torch.randn(2, t, 16)  # GQA 6/2
    if kernel == "fused":  # head dim 16: the C++ kernel serves (it falls back to the loop otherwise)
        assert cpu_ops.attention_refusal(q, k) is None
    out = attention.CPU[kernel](q, k, v, bounds, 16 ** -0.5, window)
    torch.testing.assert_close(out, dense_attention(q, k, v, bounds, window), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 48])  # 48: three vectors of 16, the P.V loop's partial pass
def test_fused_prefill_kernel_in_bf16_and_on_threads(dtype, head_dim):
    """bf16 is widened to fp32 and rounded once; prompts split over threads give the same bits."""
    torch.manual_seed(0)
    lengths = [33, 1, 70, 16, 17]
    bounds = tuple([0] + torch.cumsum(torch.tensor(lengths), 0).tolist())
    t = bounds[-1]
    q, k, v = (torch.randn(n, t, head_dim).to(dtype) for n in (6, 2, 2))
    ref = dense_attention(q.float(), k.float(), v.float(), bounds, None)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            outs.append(attention.CPU["fused"](q, k, v, bounds, head_dim ** -0.5, None))
    finally:
        torch.set_num_threads(threads)
    assert outs[0].dtype == dtype and torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].float(), ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)


def test_attention_function_boundaries_from_kwargs_or_positions():
    """cu_seq_lens kwargs and packed position ids give the same result; a mask with cu_seq_lens is refused."""
    module = torch.nn.Module()
    module.is_causal = True
    lengths = [5, 11, 3]
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    q, k, v = torch.randn(1, 4, 19, 8), torch.randn(1, 2, 19, 8), torch.randn(1, 2, 19, 8)
    a, _ = attention.varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    b, _ = attention.varlen_attention(module, q, k, v, None, position_ids=pos)
    ref = dense_attention(q[0], k[0], v[0], tuple(cu.tolist()), None)
    torch.testing.assert_close(a[0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(b[0], ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="both cu_seq_lens and an attention mask"):
        attention.varlen_attention(module, q, k, v, torch.ones(1, 1, 19, 19, dtype=torch.bool), cu_seq_lens_q=cu)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        attention.varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, softcap=30.0)


def test_stream_layout_and_cu_seqlens():
    s = pack([[1, 2, 3], [4], [5, 6]], stream=True)
    assert s.num_rows == 1 and s.width == 6 and s.efficiency == 1.0
    assert s.cu_seqlens.tolist() == [0, 3, 4, 6]  # input order
    rows = pack([[1, 2, 3], [4], [5, 6]], capacity=3)  # 3 | 2+1 ; pad runs are segments of their own
    assert rows.num_rows == 2 and rows.cu_seqlens.tolist() == [0, 3, 5, 6]
    rows = pack([[1, 2, 3], [4]], capacity=3)  # 3 | 1 + a pad run of 2
    assert rows.cu_seqlens.tolist() == [0, 3, 4, 6]


def tiny_llama(hidden: int = 32, **kw) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("stream", [True, False], ids=["one-stream", "rows-with-pad-runs"])
def test_varlen_forward_equals_dense_forward(stream):
    model = tiny_llama()
    assert forward.enable_varlen(model) and model.config._attn_implementation == attention.NAME
    rng = random.Random(1)
    prompts = [[rng.randrange(128) for _ in range(n)] for n in [17, 1, 40, 9, 33, 5]]
    batch = pack(prompts, capacity=40, stream=stream)
    varlen, _ = forward.last_token_logits(model, batch, varlen=True)
    dense, _ = forward.last_token_logits(model, batch, varlen=False)
    torch.testing.assert_close(varlen, dense, atol=1e-5, rtol=0)


def _peak_rss_growth(fn) -> int:
    """Bytes the process' peak RSS rose above its current RSS while fn ran (Linux VmHWM)."""
    def read(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = read("VmRSS")
    fn()
    return read("VmHWM") - before


def test_64_prompts_of_2048_tokens_prefill_without_a_w_by_w_mask(monkeypatch):
    """One group, one stream of 131,072 tokens: no packed mask, no tensor with two dims >= 2048."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n, length = 64, 2048
    model = tiny_llama(hidden=16)  # activations ~ T x 16 floats: small next to a W x W mask
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": None, "__len__": lambda self: 128})()
    engine = Engine(model, tok, EngineConfig(max_group_prompts=n, max_group_tokens=n * length))
    assert engine.varlen

    def no_mask(*args, **kwargs):
        raise AssertionError("the dense packed mask was built")
    monkeypatch.setattr(masks, "packed_causal", no_mask)

    class Shapes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2:
                    Shapes.largest = max(Shapes.largest, min(t.shape[-1], t.shape[-2]))
            return out

    prompts = [[(i * 7 + j) % 128 for j in range(length)] for i in range(n)]
    holder = {}

    def run():
        with Shapes():
            holder["logits"] = engine.prefill(prompts)
    grew = _peak_rss_growth(run)
    assert holder["logits"].shape == (n, 128) and torch.isfinite(holder["logits"]).all()
    assert Shapes.largest < length, f"a tensor with two dims >= {Shapes.largest} was created"
    # The dense path's [64, 1, 2048, 2048] bool mask alone is 256 MiB (and it builds several
    # such temporaries); a [1, 1, T, T] mask over the stream would be 16 GiB.
    dense_mask_bytes = n * length * length
    assert grew < dense_mask_bytes, f"peak RSS grew {grew / 2**20:.0f} MiB"


def test_eager_model_falls_back_to_dense(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu", attn_implementation="eager")
    assert "eager" in forward.varlen_refusal(model)
    engine = Engine(model, tok)
    assert not engine.varlen and model.config._attn_implementation == "eager"
    assert engine.pack([[1, 2, 3], [4, 5]]).num_rows == 2  # dense rows of the longest prompt, not one stream


def test_softcapping_model_is_refused_and_never_runs_varlen():
    """gemma2 soft-caps attention logits: refused by the check; forced onto the kernel it raises."""
    cfg = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    assert forward.varlen_refusal(model) is not None and not forward.enable_varlen(model)
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation(attention.register())  # forced past the check
    batch = pack([[1, 2, 3], [4, 5]], stream=True)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        forward.last_token_logits(model, batch, varlen=True)
