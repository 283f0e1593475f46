"""One request's state as the engine sees it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from tandem.engine.sampling import SamplingParams
from tandem.engine.text import TextStream

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose KV is in the cache
    finish_reason: str | None = None  # "stop" (eos or stop string), "length", "abort"
    stream: TextStream | None = None
    pending_text: str = ""  # text produced by the last step(s), taken by the caller
    generator: torch.Generator | None = None
    first_token_s: float | None = None  # time the first output token was sampled (perf_counter)

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_text(self) -> str:
        out, self.pending_text = self.pending_text, ""
        return out
