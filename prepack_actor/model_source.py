"""Resolve `model.path` to something `from_pretrained` loads (no Ray import).

`tiny:ARCH[:SIZE]` (e.g. `tiny:llama`, `tiny:llama:small`) means: build that random-weight
checkpoint with `build_tiny_model` once under `cache_dir` and use it; no download. Any
other value (HF id or local dir) is returned unchanged.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .tiny import ARCHS, SIZES, build_tiny_model


def resolve_model_path(path: str, cache_dir: str | Path) -> str:
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
