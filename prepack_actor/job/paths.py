"""Input and output paths that cannot hurt each other (no Ray import).

    problem = path_conflict(input_path, output_path, mode, storage)   # one line, or None

Checked before any work: an output folder inside the input would be listed and read back
as input on the next run (refused in every mode); an output path that equals or contains
the input would have output.mode=overwrite delete the input (refused for overwrite; equal
paths are refused in every mode). Local paths are compared after resolving symlinks; a
glob input is compared by its folder part (the path up to its first wildcard).
"""
from __future__ import annotations

import os

from .config import StorageConfig
from .storage import filesystem, is_local


def _base(fs, root: str) -> str:
    """The folder part of a path or glob, without a trailing slash (resolved when local)."""
    parts = root.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            root = "/".join(parts[:i]) or "/"
            break
    if is_local(fs):
        root = os.path.realpath(root)
    return root.rstrip("/") or "/"


def _inside(child: str, parent: str) -> bool:
    return child != parent and child.startswith(parent.rstrip("/") + "/")


def path_conflict(input_path: str, output_path: str, mode: str, storage: StorageConfig | None = None) -> str | None:
    fin, rin = filesystem(input_path, storage)
    fout, rout = filesystem(output_path, storage)
    if type(fin) is not type(fout):
        return None
    src, dst = _base(fin, rin), _base(fout, rout)
    is_file_input = not any(c in rin for c in "*?[") and fin.isfile(rin)
    if dst == src:
        return (f"output.path {output_path!r} is the input.path; write the output to a folder of its own "
                "(overwrite would delete the input, and resume would read its own files back)")
    if _inside(src, dst) and mode == "overwrite":
        return (f"output.path {output_path!r} contains input.path {input_path!r}: output.mode=overwrite would "
                "delete the input; choose another output.path")
    if not is_file_input and _inside(dst, src):
        return (f"output.path {output_path!r} is inside input.path {input_path!r}: its files would be read "
                "back as input; choose an output.path outside the input")
    return None
