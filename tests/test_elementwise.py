"""C++ RMSNorm and RoPE (core/cpu_elementwise.cpp) against Hugging Face's own functions, and their
scoped swap into a model (core/elementwise.py). The engine-level guard is test_architectures.py:
every family there runs these kernels where the probes accept them and equals HF alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from prepack_actor.core import cpu_ops, elementwise
from prepack_actor.core.elementwise import fused_elementwise

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    assert cpu_ops.ops() is not None, "CI builds the C++ kernels (g++ and ninja are installed)"
    return cpu_ops.ops()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [768, 37])  # 37: the scalar tail of the vector sum
def test_rms_norm_equals_hugging_face(ops, dtype, n):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(n, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n))
    x = (torch.randn(5, 9, n) * 4).to(dtype)
    want = norm(x)
    got = ops.rms_norm(x, norm.weight.data, 1e-5)
    assert got.dtype == dtype and got.shape == want.shape
    # the mean of squares is summed in another order: fp32 rounding apart; bf16 at most one unit of its last place
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)
    if dtype == torch.float32:
        assert not torch.equal(ops.rms_norm(x, norm.weight.data * 2, 1e-5), got)  # the weight is applied


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 8])  # 64: 16-float vectors; 8: the scalar loop
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_gives_hugging_faces_bits(ops, dtype, head_dim, unsqueeze_dim):
    torch.manual_seed(0)
    b, t, h, hkv = 2, 11, 6, 2
    # as the attention layers make them: transposed views of the projections' [B, T, H, D]
    q = torch.randn(b, t, h, head_dim).to(dtype)
    k = torch.randn(b, t, hkv, head_dim).to(dtype)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = torch.randn(b, t, head_dim).to(dtype), torch.randn(b, t, head_dim).to(dtype)
    want = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    got = elementwise._rope(apply_rotary_pos_emb)(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    for g, w in zip(got, want):
        assert g.dtype == dtype and torch.equal(g, w)
    assert ops.rope(q, cos.unsqueeze(unsqueeze_dim).expand_as(q), sin.unsqueeze(unsqueeze_dim).expand_as(q)).stride() \
        == q.stride()  # the output keeps the input's layout


def test_rope_calls_it_cannot_serve_go_to_the_original():
    seen = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        seen.append(cos.shape[-1])
        return q, k

    wrap = elementwise._rope(original)
    q = torch.randn(1, 2, 3, 8)
    wrap(q, q, torch.randn(1, 3, 4), torch.randn(1, 3, 4))  # partial rotary: cos covers half the head
    wrap(q.half(), q.half(), torch.randn(1, 3, 8).half(), torch.randn(1, 3, 8).half())  # fp16
    wrap(q, q, torch.randn(1, 3, 8), torch.randn(1, 3, 8), 2)  # unsqueeze_dim given positionally
    wrap(q, q, torch.randn(1, 5, 8), torch.randn(1, 5, 8))  # positions that do not match q's: the original's error
    assert seen == [4, 8, 8, 8]


def test_the_swap_is_scoped_probed_and_exact():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    for m in model.modules():
        if isinstance(m, LlamaRMSNorm):
            nn.init.normal_(m.weight)
    gemma_like = GemmaRMSNorm(64)  # weight * (1 + w): its probe must refuse it
    model.model.extra = gemma_like
    ids = torch.randint(0, 64, (2, 13))
    with torch.inference_mode():
        want = model(ids).logits
        original = modeling_llama.apply_rotary_pos_emb
        with fused_elementwise(model):
            norms = [m for m in model.modules() if "forward" in m.__dict__]
            assert len(norms) == 5 and gemma_like not in norms  # 2 x 2 layer norms and the final one
            assert modeling_llama.apply_rotary_pos_emb is not original
            with fused_elementwise(model):  # re-entrant: the inner block neither re-swaps nor restores
                pass
            assert modeling_llama.apply_rotary_pos_emb is not original and "forward" in model.model.norm.__dict__
            got = model(ids).logits
        assert modeling_llama.apply_rotary_pos_emb is original
        assert not any("forward" in m.__dict__ for m in model.modules())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        elementwise.ENABLED = False
        try:
            with fused_elementwise(model):
                assert modeling_llama.apply_rotary_pos_emb is original
        finally:
            elementwise.ENABLED = True


def test_norms_with_another_signature_keep_their_forward():
    class GatedRMSNorm(nn.Module):  # what Mamba-style gated norms look like: forward(x, gate)
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, x, gate=None):
            return LlamaRMSNorm.forward(self, x) * (1 if gate is None else gate)

    assert not elementwise._is_rms_norm(GatedRMSNorm())
    assert elementwise._is_rms_norm(LlamaRMSNorm(8))
