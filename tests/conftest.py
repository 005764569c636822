"""Shared fixtures: small random-weight checkpoints built once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from prepack_actor.tiny import build_tiny_model  # noqa: E402

ARCHS = ("llama", "qwen2", "mistral", "gpt2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch) -> checkpoint dir of a tiny random `arch` model (built once)."""
    built: dict[str, str] = {}

    def get(arch: str = "llama") -> str:
        if arch not in built:
            built[arch] = str(build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}")))
        return built[arch]

    return get
