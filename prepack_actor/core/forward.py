"""The packed forward pass: one model call over packed rows, the LM head only where needed.

Two attention paths over the same PackedBatch:
- varlen (attention.NAME): segment boundaries as cu_seq_lens kwargs, no 4D mask, work
  proportional to each prompt's own query-key pairs. Used when the model runs
  attention.NAME and the batch has no branches.
- dense mask: masks.for_model's [R, 1, W, W] block-diagonal mask. The reference, the
  fallback for models varlen cannot serve (see varlen_refusal), and the scoring tree
  layout (a branch is not a contiguous causal segment: it sees its prompt but skips its
  siblings, which cu_seqlens cannot say).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import DynamicCache

from . import attention, masks
from .compile import opaque_cache
from .packing import PackedBatch


@contextmanager
def head_only_at(model, slots: torch.Tensor):
    """Run the LM head only at `slots` [N], flat indices into the [R, W] rows.

    A pre-hook swaps the head's input [R, W, H] for [1, N, H], so logits come out
    [1, N, V] instead of [R, W, V]; the model's own logit post-processing (scaling,
    soft-capping) still runs on them.
    """
    def keep(module, args):
        hidden = args[0]  # [R, W, H]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, slots.to(hidden.device))[None],) + args[1:]

    handle = model.get_output_embeddings().register_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def varlen_refusal(model) -> str | None:
    """Why this model's packed prefill cannot run on varlen attention, or None when it can.

    Served: models whose attention modules call transformers' AttentionInterface, are
    sdpa-compatible and run sdpa (or attention.NAME already). Refused (dense-mask path):
    eager or other implementations, modules outside the interface (e.g. alibi models),
    attention logit soft-capping (gemma2), attention sinks (gpt-oss), encoder-decoders,
    chunked attention and attention temperature tuning (Llama 4).
    """
    cfg = model.config
    impl = cfg._attn_implementation
    if impl not in ("sdpa", attention.NAME):
        return f"attention implementation {impl!r} (varlen replaces sdpa only)"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not call transformers' attention interface"
    if not getattr(model, "_supports_sdpa", False):
        return f"{type(model).__name__} is not sdpa-compatible"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model"
    for key in ("attn_logit_softcapping", "alibi", "use_alibi"):
        if getattr(cfg, key, None):
            return f"config.{key} = {getattr(cfg, key)!r} is not implemented by the varlen kernel"
    qk = getattr(cfg, "qk_head_dim", None) or (getattr(cfg, "qk_nope_head_dim", 0) + getattr(cfg, "qk_rope_head_dim", 0))
    if getattr(cfg, "v_head_dim", None) and qk and cfg.v_head_dim != qk:
        return f"value head dim {cfg.v_head_dim} != query/key head dim {qk} (MLA) is not implemented by the varlen kernel"
    if "chunked_attention" in (getattr(cfg, "layer_types", None) or ()):
        return "chunked attention layers are not implemented by the varlen kernel"
    if getattr(cfg, "attn_temperature_tuning", False):
        return "attention temperature tuning scales queries by the column in the stream"
    if any(name.endswith("sinks") for name, _ in model.named_parameters()):
        return "attention sinks are not implemented by the varlen kernel"
    return None


def use_varlen(model) -> bool:
    """True when packed prefill of `model` can run on varlen attention (see varlen_refusal)."""
    return varlen_refusal(model) is None


def enable_varlen(model) -> bool:
    """Switch a servable model to attention.NAME (sdpa for every call without cu_seq_lens); returns use_varlen."""
    if not use_varlen(model):
        return False
    if model.config._attn_implementation != attention.NAME:
        model.set_attn_implementation(attention.register())
    return True


@contextmanager
def plain_sdpa(model):
    """The model on sdpa inside the block when it runs attention.NAME (for code that insists on
    sdpa, e.g. transformers' continuous batching, or an independent reference); restored after."""
    impl = model.config._attn_implementation
    if impl == attention.NAME:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if impl == attention.NAME:
            model.set_attn_implementation(impl)


@torch.inference_mode()
def packed_forward(model, batch: PackedBatch, slots: torch.Tensor, use_cache: bool = True,
                   varlen: bool | None = None):
    """Run the packed rows; returns (logits [N, V] at flat `slots` [N], packed cache or None).

    varlen None: varlen when the model runs attention.NAME and the batch has no branches.
    """
    device = model.device
    if varlen is None:
        varlen = model.config._attn_implementation == attention.NAME and not len(batch.branch_length)
    if varlen:
        assert model.config._attn_implementation == attention.NAME, "varlen needs enable_varlen(model) first"
        assert not len(batch.branch_length), "branches need the dense mask (not contiguous causal segments)"
        cu = batch.cu_seqlens.to(device)  # [S + 1]
        longest = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
        attn = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:
        attn = dict(attention_mask=masks.for_model(model, batch))  # [R, 1, W, W]
    cache = opaque_cache(DynamicCache()) if use_cache else None
    with head_only_at(model, slots):
        out = model(
            input_ids=batch.input_ids.to(device),  # [R, W]
            position_ids=batch.position_ids.to(device),  # [R, W]
            # plain layers: a sliding layer would drop other prompts' keys
            past_key_values=cache,
            use_cache=use_cache,
            **attn,
        )
    return out.logits[0], out.past_key_values if use_cache else None


def last_token_logits(model, batch: PackedBatch, varlen: bool | None = None):
    """Per-prompt next-token logits [P, V] (fp32) and the packed cache."""
    row, col = batch.last_index
    logits, cache = packed_forward(model, batch, row * batch.width + col, varlen=varlen)
    return logits.float(), cache


@torch.inference_mode()
def target_logprobs(model, batch: PackedBatch, slots: torch.Tensor, targets: torch.Tensor,
                    varlen: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of token targets[t] at flat slot slots[t] (the slot that predicts it), no cache.

    The LM head and log_softmax run once per distinct slot (sibling continuations share the
    context's last slot). Returns (log-prob [T] fp32, the target is the argmax [T] bool) on CPU.
    """
    columns, inverse = torch.unique(slots, return_inverse=True)  # [C], [T]
    logits, _ = packed_forward(model, batch, columns, use_cache=False, varlen=varlen)  # [C, V]
    logits = logits.float()
    inverse, targets = inverse.to(logits.device), targets.to(logits.device)
    logprob = torch.log_softmax(logits, dim=-1)[inverse, targets]  # [T]
    greedy = logits.argmax(-1)[inverse] == targets  # [T]
    return logprob.cpu(), greedy.cpu()
