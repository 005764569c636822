"""Which path a loaded model can take so that every prompt gets what HF gives it alone.

    cap = capability_of(model)   # Capability(route="packed", ...)
    check_model(model)           # preflight: raises UnsupportedModel (model type + reason)

Read from the model's config and modules (properties, not a list of names):
- packed: the fast path. Full, sliding and chunked attention layers take prepack's
  per-prompt masks (core/masks.py); MPT's ALiBi (a per-key-column bias, a constant shift per
  query row within a prompt) and GPT-Neo's local attention pack exactly.
- packed_bucketed: packed, but a feature computed over the whole forward pass must see
  every prompt of a pass on the same side of a threshold:
    LongRoPE (Phi-3, PhiMoE) picks short or long factors from max(position_ids) of the
    pass: prompts are bucketed on the side of original_max_position_embeddings their
    prefill and decode stay on; one that crosses while decoding runs alone (unpacked).
    Llama 4 attention temperature tuning scales queries by cache column, not position; it
    is the identity below floor_scale, so prompts pack while every column used stays below
    it, and the rest run alone.
- unpacked: run the way HF would, with a one-line warning saying why:
    recurrent / hybrid models (state carried along a row: Mamba, Jamba, Qwen3-Next, LFM2
    ...): one prompt at a time through HF generate;
    ALiBi built from the 2D attention mask (Bloom, Falcon with alibi=True): left-padded HF
    batches, exact.
    models without position_ids whose positions come from the sequence (Bart-style
    decoders) and models that build their own mask from a 2D mask (no masking_utils,
    e.g. openai-gpt): one prompt at a time.
- refused (UnsupportedModel, before any work): encoder-decoders, models with no LM head,
  RoBERTa-style encoders used as decoders (position ids from padding_idx + 1: HF's own
  forward and generate disagree, so there is no single answer to match).
"""
from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass

import torch

PACKED, PACKED_BUCKETED, UNPACKED = "packed", "packed_bucketed", "unpacked"
ROUTES = (PACKED, PACKED_BUCKETED, UNPACKED)
ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


class UnsupportedModel(ValueError):
    """A model prepack cannot serve exactly; the message names the model type and the reason."""


@dataclass(frozen=True)
class Capability:
    route: str  # PACKED | PACKED_BUCKETED | UNPACKED
    reason: str = ""  # why not PACKED ("" when packed)
    model_type: str = ""
    padded: bool = False  # UNPACKED: left-padded HF batches (exact); False = one prompt at a time
    longrope_threshold: int | None = None  # PACKED_BUCKETED: original_max_position_embeddings
    temperature_floor: int | None = None  # PACKED_BUCKETED: Llama 4 floor_scale (columns below it: identity)
    chunk_size: int | None = None  # chunked attention layers: q sees k iff same chunk of positions

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", False) or k == "route"}


def capability_of(model) -> Capability:
    """Classify a loaded model into a route; raises UnsupportedModel for what cannot be served."""
    cfg = model.config
    mt = getattr(cfg, "model_type", type(model).__name__)
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModel(f"{mt}: encoder-decoder models are not causal LMs prepack can serve")
    if not callable(getattr(model, "generate", None)) or not callable(getattr(model, "get_output_embeddings", None)) \
            or model.get_output_embeddings() is None:
        raise UnsupportedModel(f"{mt}: {type(model).__name__} has no LM head / generate (not a causal LM)")
    chunk = _chunk_size(cfg)
    recurrent = _recurrent(model)
    if recurrent:
        return Capability(UNPACKED, f"{recurrent}: packing cannot carry state across prompts in a row",
                          mt, padded=False, chunk_size=chunk)
    if _positions_from_sequence(model):
        return Capability(UNPACKED, "forward takes no position_ids: positions come from the sequence itself",
                          mt, padded=False)
    if _positions_offset(model):  # HF's own forward and generate disagree here: no reference to match
        raise UnsupportedModel(f"{mt}: position ids start after padding_idx (RoBERTa-style encoder as decoder); "
                               f"HF's forward and generate number positions differently")
    if not _takes_packed_mask(model):
        return Capability(UNPACKED, "the model builds its own mask from a 2D attention mask (no masking_utils)", mt)
    if _alibi_from_mask(model):
        return Capability(UNPACKED, "ALiBi built from the 2D attention mask (left-padded batches are exact)",
                          mt, padded=True)
    threshold = _longrope_threshold(cfg)
    floor = _temperature_floor(model)
    if threshold is not None or floor is not None:
        why = []
        if threshold is not None:
            why.append(f"LongRoPE picks its factors from the largest position in the pass (threshold {threshold})")
        if floor is not None:
            why.append(f"attention temperature tuning scales queries by cache column (identity below {floor})")
        return Capability(PACKED_BUCKETED, "; ".join(why), mt, longrope_threshold=threshold,
                          temperature_floor=floor, chunk_size=chunk)
    return Capability(PACKED, "", mt, chunk_size=chunk)


def check_model(model) -> Capability:
    """Preflight: the model's Capability, after a one-line warning when it is not packed."""
    cap = capability_of(model)
    if cap.route != PACKED:
        warnings.warn(f"prepack: {cap.model_type} runs {cap.route}: {cap.reason}", stacklevel=2)
    return cap


def _recurrent(model) -> str | None:
    """Why the model carries state along the sequence (not attention), or None."""
    types = set(getattr(model.config, "layer_types", None) or ())
    other = sorted(t for t in types if isinstance(t, str)) if types else []
    other = [t for t in other if t not in ATTENTION_LAYERS]
    if other:
        return f"layer types {other}"
    if getattr(model, "_is_stateful", False):
        return f"{type(model).__name__} is stateful"
    if any(isinstance(m, torch.nn.Conv1d) for m in model.modules()):
        return "a causal convolution over the sequence (nn.Conv1d)"
    return None


def _positions_from_sequence(model) -> bool:
    """True when the model has a position embedding but no position_ids argument (Bart-style
    decoders): every packed prompt after the first would get the wrong positions."""
    if "position_ids" in inspect.signature(model.forward).parameters:
        return False
    if _alibi_from_mask(model):
        return False
    words = model.get_input_embeddings()
    return any(isinstance(m, torch.nn.Embedding) and m is not words for m in model.modules())


def _positions_offset(model) -> bool:
    """RoBERTa-style embeddings: HF alone numbers positions from padding_idx + 1."""
    return any(getattr(getattr(m, "position_embeddings", None), "padding_idx", None) is not None
               for m in model.modules())


def _takes_packed_mask(model) -> bool:
    """Models whose code builds masks with transformers' masking_utils accept prepack's 4D masks."""
    module = sys.modules.get(type(model).__module__)
    return any(n.startswith("create_") and "mask" in n for n in dir(module))


def _alibi_from_mask(model) -> bool:
    """True when the model's ALiBi bias is built from the 2D attention mask (Bloom, Falcon alibi)."""
    module = sys.modules.get(type(model).__module__)
    build = getattr(module, "build_alibi_tensor", None)
    if build is None or "attention_mask" not in inspect.signature(build).parameters:
        return False
    return bool(getattr(model.config, "alibi", True))  # Bloom has no switch: always ALiBi


def _rope_params(cfg) -> list[dict]:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        return list(rp.values())  # one per layer type
    return [rp] if isinstance(rp, dict) else []


def _longrope_threshold(cfg) -> int | None:
    for rp in _rope_params(cfg):
        if rp.get("rope_type", rp.get("type")) == "longrope":
            return int(rp.get("original_max_position_embeddings")
                       or getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings)
    return None


def _temperature_floor(model) -> int | None:
    """Llama 4: NoPE layers scale queries by log1p(floor((column + 1) / floor_scale))."""
    for m in model.modules():
        if getattr(m, "attn_temperature_tuning", False) and not getattr(m, "use_rope", True):
            return int(m.floor_scale)
    return None


def _chunk_size(cfg) -> int | None:
    if "chunked_attention" in (getattr(cfg, "layer_types", None) or ()):
        return int(cfg.attention_chunk_size)
    return None


def buckets(cap: Capability, lengths: list[int], new_tokens: list[int]) -> tuple[list[list[int]], list[int]]:
    """Split prompt indices for PACKED_BUCKETED: (packable buckets, indices that must run alone).

    new_tokens[i]: tokens prompt i generates (0 for prefill only). A prompt's forwards touch
    positions 0 .. L + n - 2 (the last token is sampled, never fed).
    """
    alone: list[int] = []
    if cap.temperature_floor is not None:
        # Decode columns reach Lmax + N - 2 for the group's longest prompt and most new
        # tokens N: with every L + N - 1 <= floor - 1 every column stays in the identity range.
        most = max([max(n, 1) for n in new_tokens] or [1])
        lengths_ok = [i for i, n in enumerate(lengths) if n + most - 1 <= cap.temperature_floor - 1]
        alone = sorted(set(range(len(lengths))) - set(lengths_ok))
    else:
        lengths_ok = list(range(len(lengths)))
    if cap.longrope_threshold is None:
        return ([lengths_ok] if lengths_ok else []), alone
    t = cap.longrope_threshold
    short = [i for i in lengths_ok if lengths[i] + max(new_tokens[i], 1) - 1 <= t]
    long = [i for i in lengths_ok if lengths[i] > t]
    crossing = set(lengths_ok) - set(short) - set(long)
    return [b for b in (short, long) if b], sorted(alone + list(crossing))


def width_limit(cap: Capability, lengths: list[int]) -> int | None:
    """The most columns one packed pass of this bucket may use (row width, stream length), or None.

    Temperature tuning: every column below floor - 1. LongRoPE short bucket: the pad run
    at a row's end restarts its positions, so rows no wider than the threshold keep it short.
    """
    limits = []
    if cap.temperature_floor is not None:
        limits.append(cap.temperature_floor - 1)
    if cap.longrope_threshold is not None and max(lengths) <= cap.longrope_threshold:
        limits.append(cap.longrope_threshold)
    return min(limits) if limits else None
