"""Sampling parameters and the per-prompt sampler.

Each prompt draws its random numbers from its own generator seeded by its own seed, one
uniform per step, on the CPU. So a prompt's tokens depend only on its logits and its
seed, never on which other prompts share its batch or pack, nor on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 16  # tokens to generate at most, >= 1
    temperature: float = 0.0  # 0 = greedy; > 0 scales logits before sampling
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 disables
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    seed: int | None = None  # per-prompt seed; None draws one from torch's global RNG
    stop: list[str] = field(default_factory=list)  # strings that end generation ("stop")
    ignore_eos: bool = False  # keep generating past EOS (benchmarks with fixed lengths)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]


class Sampler:
    """Vectorised temperature / top-k / top-p sampling with one generator per prompt."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.temperature = torch.tensor([p.temperature for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.generators = []
        for p in params:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generators.append(torch.Generator().manual_seed(seed) if p.temperature > 0 else None)

    def select(self, keep: torch.Tensor) -> None:
        """Keep the prompts at positions `keep` (finished prompts leave the batch)."""
        self.temperature, self.top_p, self.top_k = (
            self.temperature[keep], self.top_p[keep], self.top_k[keep])
        self.generators = [self.generators[i] for i in keep.tolist()]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> next tokens [B]."""
        greedy = logits.argmax(-1)  # [B]
        if not any(g is not None for g in self.generators):
            return greedy
        # One uniform per sampling prompt, from its own generator; greedy prompts draw nothing.
        u = torch.tensor([float(torch.rand((), generator=g)) if g is not None else 0.0
                          for g in self.generators], device=logits.device)  # [B]
        t = self.temperature.clamp(min=1e-5)[:, None]
        sorted_logits, order = (logits.float() / t).sort(dim=-1, descending=True, stable=True)  # [B, V]
        rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        k = torch.where(self.top_k > 0, self.top_k, logits.shape[-1])[:, None]
        sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        probs = probs.masked_fill(cum - probs >= self.top_p[:, None], 0.0)
        cdf = probs.cumsum(-1)  # [B, V]
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=logits.shape[-1] - 1)
        sampled = order.gather(-1, pick).squeeze(-1)  # [B]
        return torch.where(self.temperature > 0, sampled, greedy)
