"""The fused CPU decode-attention kernel (cpu_decode.cpp), built on first use.

torch's C++ extension loader compiles it once per machine into TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions; ~20 s here, later processes load the build) with
-march=native, so the name carries a hash of this CPU's flags: hosts of a cluster that share a
home directory each get a build of their own. The Engine's constructor probes one decode
step (core/decode.block_decode_refusal), so the build happens there (a job actor's load_s),
not in a first request's decode. Needs a C++ compiler and ninja (a dependency); without
them, or if the build fails, `op()` is None and block_attention runs its "loop" kernel (same
numbers within fp32 rounding) after one warning.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
MAX_HEAD_DIM = 256  # as MAX_DV * 16 in the source
_lock = threading.Lock()
_built: list = []  # [op or None] once tried


def _name() -> str:
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    digest = hashlib.sha1(f"{platform.machine()} {flags} {torch.__version__}".encode()).hexdigest()[:10]
    return f"prepack_cpu_decode_{digest}"


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip package's lies in the venv's bin, not on PATH unless activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def op():
    """The compiled `decode_attention(q, k, v, ranges, scale)`, or None when it cannot be built here."""
    with _lock:
        if not _built:
            try:
                from torch.utils.cpp_extension import load
                _ninja_on_path()
                ext = load(_name(), [str(SOURCE)], extra_cflags=["-O3", "-march=native"], verbose=False)
                _built.append(ext.decode_attention)
            except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: the loop serves
                warnings.warn(f"prepack: the fused CPU decode kernel could not be built ({type(e).__name__}: "
                              f"{str(e)[:300]}); decode attention runs the per-row 'loop' kernel", stacklevel=2)
                _built.append(None)
        return _built[0]


def refusal(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the fused kernel cannot serve these tensors (then the loop does), or None."""
    if q.device.type != "cpu":
        return f"device {q.device.type}"
    if q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype} (float32 or bfloat16)"
    d = q.shape[-1]
    if d % 16 or d > MAX_HEAD_DIM:
        return f"head dim {d} (a multiple of 16, at most {MAX_HEAD_DIM})"
    if op() is None:
        return "the kernel could not be built on this machine"
    return None
