"""prepack: prepacked prefill, generation and scoring for Hugging Face causal LMs.

core/ is the mechanism (tensors only); engine, scoring, inputs and models are the library;
job/ runs it on Ray Data (the only package that imports ray); bench/ measures it.
Exports load on first use, so `prepack_actor.job.config` (a job's --help) imports no torch.
"""
from importlib import import_module

_EXPORTS = {
    "PackedBatch": "core.packing", "ffd": "core.packing", "pack": "core.packing",
    "SamplingParams": "core.params",
    "Engine": "engine", "EngineConfig": "engine", "GenerationResult": "outputs", "Completion": "outputs",
    "Logprob": "core.sampling",
    "InputError": "inputs", "ItemError": "inputs", "PromptError": "inputs",
    "ModelLoadError": "models", "load_model": "models",
    "ScoreConfig": "scoring", "ScoreResult": "scoring", "Scorer": "scoring", "score": "scoring",
    "build_tiny_model": "tiny",
    "Capability": "capability", "UnsupportedModel": "capability", "capability_of": "capability",
    "check_model": "capability",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prepack_actor' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
