"""prepack's C++ CPU kernels, built on first use: decode attention (cpu_decode.cpp), packed prefill
attention (cpu_prefill.cpp), RMSNorm and rotary embeddings (cpu_elementwise.cpp).

torch's C++ extension loader compiles them once per machine into TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions; ~13 s on this 2-core machine, later processes load the
build) with -march=native, so the name carries a hash of this CPU's flags (and of the
sources, their path and the compiler, $CXX): hosts of a cluster that share a home directory
each get a build of their own. The Engine's constructor probes one decode step (core/decode.block_decode_refusal),
so the build happens there (a job actor's load_s), not in a first request's decode. Needs a
C++ compiler (g++ >= 12 or clang++, tested with both: GCC's vector extensions) and ninja (a dependency);
without them, or if the build fails, `ops()` is None after one warning, and each caller runs
torch's ops instead (same numbers within fp32 rounding): block_attention its "loop" kernel,
attention.py its per-prompt sdpa "loop" (or "block"), elementwise.py Hugging Face's forward.
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

HERE = Path(__file__).parent
SOURCES = [HERE / f for f in ("cpu_ops.cpp", "cpu_decode.cpp", "cpu_prefill.cpp", "cpu_elementwise.cpp")]
HEADERS = [HERE / "cpu_vec.h"]
DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 256  # attention: as MAX_DV * 16 in cpu_decode.cpp, MAX_D in cpu_prefill.cpp
_lock = threading.Lock()
_built: list = []  # [module or None] once tried


def _name() -> str:
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    code = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    # the install path too: torch's loader rebuilds a name whose sources moved, so two installs
    # sharing one extensions dir (a checkout and a venv, a CI clone) would rebuild in turn
    cxx = os.environ.get("CXX", "c++")  # torch's loader compiles with $CXX
    digest = hashlib.sha1(f"{platform.machine()} {flags} {torch.__version__} {HERE} {cxx}".encode() + code).hexdigest()[:10]
    return f"prepack_cpu_ops_{digest}"


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip package's lies in the venv's bin, not on PATH unless activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def ops():
    """The compiled module (`decode_attention`, `prefill_attention`, `rms_norm`, `rope`), or None when it cannot be built here."""
    with _lock:
        if not _built:
            try:
                from torch.utils.cpp_extension import load
                _ninja_on_path()
                _built.append(load(_name(), [str(p) for p in SOURCES], extra_cflags=["-O3", "-march=native"],
                                   verbose=False))  # cpu_vec.h: found beside the sources
            except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: torch's ops serve
                warnings.warn(f"prepack: the C++ CPU kernels could not be built ({type(e).__name__}: {str(e)[:300]}); "
                              f"attention runs the per-row / per-prompt 'loop' kernels, RMSNorm and RoPE torch's ops",
                              stacklevel=2)
                _built.append(None)
        return _built[0]


def refusal(x: torch.Tensor) -> str | None:
    """Why the kernels cannot serve tensors like x (then torch's ops do), or None."""
    if x.device.type != "cpu":
        return f"device {x.device.type}"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (float32 or bfloat16)"
    if ops() is None:
        return "the kernels could not be built on this machine"
    return None


def attention_refusal(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the C++ attention kernels (decode, prefill) cannot serve these tensors (then torch's do), or None."""
    if k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}"
    d = q.shape[-1]
    if q.device.type == "cpu" and (d % 16 or d > MAX_HEAD_DIM):
        return f"head dim {d} (a multiple of 16, at most {MAX_HEAD_DIM})"
    return refusal(q)
