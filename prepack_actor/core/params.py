"""SamplingParams: vLLM's names and ranges, checked on construction (no torch import, so a
job's config is checked before any heavy import).

Every check raises ValueError("KEY: expected ..., got ..."); the job prefixes the section
("sampling.top_p: ...") or the row's column ("sampling_params.top_p: ...").
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields, replace
from typing import Mapping

VLLM_NAMES = {"max_tokens": "max_new_tokens"}  # vLLM's name -> ours, for a hint in errors
INT32_MAX, INT64_MAX = 2 ** 31 - 1, 2 ** 63 - 1  # counts fit an int32 length; seeds an int64 column


@dataclass
class SamplingParams:
    max_new_tokens: int = 16  # tokens to generate at most, >= 1 (vLLM's max_tokens)
    temperature: float = 0.0  # 0 = greedy; > 0 scales logits before sampling
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 disables
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one, in [0, 1]; 0 disables
    seed: int | None = None  # per-prompt seed, >= 0; None draws one from torch's global RNG
    n: int = 1  # completions per prompt, >= 1 (one prefill; the prompt's cache is copied n times)
    stop: list[str] = field(default_factory=list)  # strings that end generation ("stop"), cut from the text
    stop_token_ids: list[int] = field(default_factory=list)  # token ids that end generation (kept in token_ids)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks with fixed lengths)
    min_tokens: int = 0  # no EOS, stop token or stop string before this many tokens, in [0, max_new_tokens]
    repetition_penalty: float = 1.0  # > 0; divides positive (multiplies negative) logits of prompt and output tokens
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted once per time a token was already generated
    logprobs: int | None = None  # None = off; k >= 0: the chosen token's log-prob and the top k per step

    def __post_init__(self):
        for key, low in (("max_new_tokens", 1), ("top_k", 0), ("n", 1), ("min_tokens", 0)):
            v = getattr(self, key)
            _check(key, v, _is_int(v) and v >= low, f"an int >= {low}")
            _check(key, v, v <= INT32_MAX, f"an int <= {INT32_MAX}")
        for key, ok, expected in (
                ("temperature", lambda v: v >= 0, "a number >= 0"),
                ("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]"),
                ("min_p", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                ("repetition_penalty", lambda v: v > 0, "a number > 0"),
                ("presence_penalty", lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
                ("frequency_penalty", lambda v: -2 <= v <= 2, "a number in [-2, 2]")):
            v = getattr(self, key)
            _check(key, v, _is_number(v) and ok(v), expected)
            setattr(self, key, float(v))
        for key, high in (("seed", INT64_MAX), ("logprobs", INT32_MAX)):
            v = getattr(self, key)
            _check(key, v, v is None or (_is_int(v) and v >= 0), "null or an int >= 0")
            _check(key, v, v is None or v <= high, f"an int <= {high}")
        _check("min_tokens", self.min_tokens, self.min_tokens <= self.max_new_tokens,
               f"an int <= max_new_tokens ({self.max_new_tokens})")
        _check("ignore_eos", self.ignore_eos, isinstance(self.ignore_eos, bool), "true or false")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check("stop", self.stop, isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop),
               "a string or a list of strings")
        self.stop = [s for s in self.stop if s]
        ids = self.stop_token_ids
        _check("stop_token_ids", ids, isinstance(ids, (list, tuple)) and all(_is_int(i) and i >= 0 for i in ids),
               "a list of token ids (ints >= 0)")
        self.stop_token_ids = list(ids)

    def with_overrides(self, overrides: Mapping) -> SamplingParams:
        """A copy with some fields replaced (a row's own settings); a None value keeps the field.
        An unknown key or a bad value raises ValueError("KEY: expected ..., got ...")."""
        known = [f.name for f in fields(self)]
        for k in overrides:
            if k not in known:
                hint = (f"vLLM's {k} is {VLLM_NAMES[k]} here" if k in VLLM_NAMES
                        else f"expected one of {', '.join(known)}")
                raise ValueError(f"{k}: unknown sampling key ({hint})")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(key: str, value, ok: bool, expected: str) -> None:
    if not ok:
        text = repr(value)
        raise ValueError(f"{key}: expected {expected}, got {text if len(text) <= 80 else text[:77] + '...'}")


def sequence_seeds(seed: int, n: int) -> list[int]:
    """Seeds of a prompt's n sequences: the first is the prompt's own (so n = 1 and the first
    of n agree), the others a hash of (seed, index): the same on every run and machine."""
    return [seed] + [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") >> 2
                     for i in range(1, n)]
