"""Load a model and tokenizer from a Hugging Face id or a local checkpoint directory."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or tokenizer at a path could not be loaded."""


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU that supports it, float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(path: str, dtype: str = "auto", device: str = "auto", attn_implementation: str = "sdpa",
               trust_remote_code: bool = False):
    """Return (model, tokenizer), the model in eval mode on `device`.

    attn_implementation: "sdpa" (default) or "eager"; both take prepack's packed masks.
    """
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is one message for the user
        raise ModelLoadError(f"cannot load model from {path!r}: {type(e).__name__}: {e}") from e
    if tokenizer.pad_token_id is None:  # padded baselines need one; prepacking does not
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dev).eval(), tokenizer
