"""Every way to get a model: HF id, local directory or `tiny:ARCH[:SIZE]`; dtype and device rules.

    path = resolve_model_path("tiny:llama", cache_dir="artifacts/models")   # built once, no download
    model, tokenizer = load_model(path, dtype="auto", device="auto")
    tokenizer, max_context = load_tokenizer(path)                            # no weights (CPU stages)
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
import transformers.dynamic_module_utils as _dynamic
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .capability import UNPACKED, Capability, UnsupportedModel, capability_of, check_model
from .core import attention
from .core.compile import compile_refusal, compiled
from .core.elementwise import fused_elementwise
from .core.linear import onednn_linear, onednn_refusal
from .tiny import ARCHS, SIZES, build_tiny_model

attention.register()  # "prepack_varlen" is known to transformers wherever models are loaded
# A checkpoint with its own code runs it only when the caller passes trust_remote_code=True.
# Every load here passes it explicitly; with no prompt timeout, a call that forgot would
# raise instead of asking "[y/N]" on a terminal (transformers prompts when it is None).
_dynamic.TIME_OUT_REMOTE_CODE = 0

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


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", attention.NAME)


def model_class(config):
    """The causal-LM class transformers would build for `config` (remote code included)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.auto_factory import _get_model_class

    remote = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if remote:
        return get_class_from_dynamic_module(remote, config.name_or_path)
    return _get_model_class(config, AutoModelForCausalLM._model_mapping)


def resolve_attn(config, attn_implementation: str) -> str:
    """'auto' -> sdpa when the model class supports it, else eager; an explicit sdpa it lacks is refused."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    if attn_implementation not in ("auto", "sdpa"):
        return attn_implementation
    try:
        cls = model_class(config)
    except (ValueError, KeyError) as e:
        raise UnsupportedModel(f"{config.model_type}: no causal-LM class in transformers ({e})") from None
    if getattr(cls, "_supports_sdpa", False):
        return "sdpa"
    if attn_implementation == "sdpa":
        raise UnsupportedModel(f"{config.model_type}: {cls.__name__} has no sdpa attention in transformers; "
                               f"use attn_implementation 'auto' or 'eager'")
    return "eager"


def preflight(path: str, attn_implementation: str = "auto", trust_remote_code: bool = False) -> Capability:
    """The model's Capability from its config alone (modules built on the meta device, no weights);
    raises UnsupportedModel before any work when it cannot be served."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config._attn_implementation = resolve_attn(config, attn_implementation)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return capability_of(model)


def load_model(path: str, dtype: str = "auto", device: str = "auto", attn_implementation: str = "auto",
               trust_remote_code: bool = False):
    """Return (model, tokenizer), the model in eval mode on `device`.

    attn_implementation: "auto" (default: sdpa where the model class supports it, else
    eager), "sdpa", "eager" or "prepack_varlen"; all take prepack's packed masks. The Engine
    switches an sdpa model to prepack_varlen for packed prefill (forward.enable_varlen)
    unless EngineConfig(varlen=False). An explicit "sdpa" on a class without it raises
    UnsupportedModel.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is one message for the user
        raise ModelLoadError(f"cannot load model from {path!r}: {type(e).__name__}: {e}") from e
    attn_implementation = resolve_attn(config, attn_implementation)
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


class ModelRunner:
    """A loaded model and tokenizer, and what every library entry point reads from them."""

    def __init__(self, model, tokenizer, onednn_linear: bool = True, compile: bool = False):
        self.model, self.tokenizer = model, tokenizer
        # CPU linear layers on oneDNN with prepacked weights inside kernels() (core/linear.py).
        self.onednn_linear = onednn_linear and onednn_refusal(model) is None
        self.device = model.device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_context = context_length(model.config)
        # The route every entry point takes (packed, bucketed, unpacked); refuses before any work.
        self.capability = check_model(model)
        self.use_compile(compile)

    def use_compile(self, on: bool) -> None:
        """Decoder layers compiled by inductor inside kernels() (core/compile.py), packed routes only."""
        self.compile = on and self.capability.route != UNPACKED and compile_refusal(self.model) is None

    def warm_up(self) -> None:
        """Compile the common shapes now rather than in the first real calls (with compile on): the
        job's actors call it at start-up, so compiling counts as their load time, not as the
        first groups' prefill. A rarer layout still compiles when it first comes."""

    @contextmanager
    def kernels(self):
        """The block the runner's model calls run in: oneDNN linear layers, C++ RMSNorm and RoPE on CPU
        (core/elementwise.py), and compiled layers where enabled."""
        with onednn_linear(self.model, self.onednn_linear), fused_elementwise(self.model), \
                compiled(self.model, self.compile):
            yield

    def sync(self) -> None:
        """Wait for the device (timings on CUDA are otherwise launch times)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def on_kernels(method):
    """Decorator: run a ModelRunner method inside its kernels() block (re-entrant)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.kernels():
            return method(self, *args, **kwargs)
    return wrapper


def context_length(config) -> int | None:
    """The model's context in tokens, from whichever key its config uses."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@lru_cache(maxsize=2)
def load_tokenizer(path: str, trust_remote_code: bool = False):
    """(tokenizer, max_context) for a resolved checkpoint path, no weights; cached per process."""
    return (AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code),
            context_length(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)))


def resolve_model_path(path: str, cache_dir: str | Path) -> str:
    """`tiny:ARCH[:SIZE]` -> a random-weight checkpoint built once under cache_dir; else unchanged."""
    if not path.startswith("tiny:"):
        return path
    parts = path.split(":")[1:]
    arch, size = parts[0], parts[1] if len(parts) > 1 else "tiny"
    if arch not in ARCHS or size not in SIZES or len(parts) > 2:
        raise ValueError(f"model.path {path!r}: expected tiny:ARCH[:SIZE], ARCH in {ARCHS}, SIZE in {tuple(SIZES)}")
    out = Path(cache_dir).resolve() / f"tiny-{arch}-{size}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build beside, then rename: concurrent builders (actors on one node) never see half a dir.
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        build_tiny_model(arch, tmp, size=size)
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
