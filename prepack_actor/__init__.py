"""prepack: prepacked prefill and generation for Hugging Face causal LMs."""
from .engine import Engine, EngineConfig, GenerationResult
from .loading import ModelLoadError, load_model
from .packing import PackedBatch, ffd, pack
from .prompts import PromptError
from .sampling import SamplingParams
from .tiny import build_tiny_model

__all__ = ["Engine", "EngineConfig", "GenerationResult", "ModelLoadError", "load_model",
           "PackedBatch", "ffd", "pack", "PromptError", "SamplingParams", "build_tiny_model"]
from .scoring import ItemError, ScoreConfig, ScoreResult, Scorer, score  # noqa: E402

__all__ += ["ItemError", "ScoreConfig", "ScoreResult", "Scorer", "score"]
