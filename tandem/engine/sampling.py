"""Sampling parameters and the sampler: penalties, temperature, top-k, top-p, min-p, seeded generators."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # Hugging Face's: divides positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every generated token's logit
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def plain_greedy(p: SamplingParams) -> bool:
    """Greedy with no penalty: the token is the logits' argmax, wherever they are."""
    return p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty


def apply_penalties(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """logits [V] float32 with the repetition, presence and frequency penalties of `p` applied."""
    if p.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits.shape[0])[: logits.shape[0]]
        logits -= p.frequency_penalty * counts.float() + p.presence_penalty * (counts > 0).float()
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V] (float32, penalties applied)."""
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[0])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
