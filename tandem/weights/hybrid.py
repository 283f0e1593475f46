"""A model directory holding one model twice: safetensors (e.g. DeepSeek-V3's FP8 release) and a GGUF quant of it
(e.g. Q4_K_M), run as KTransformers' FP8 + GGML hybrid runs them: the routed experts from the GGUF, as its blocks
for the CPU kernel; every other tensor (attention, shared experts, dense MLPs, norms, embeddings) from the
safetensors, an FP8 linear's values and scales as stored."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.models.base import ConfigError
from tandem.weights.gguf import GGUFSource, open_gguf_source
from tandem.weights.gguf_file import split_files
from tandem.weights.safetensors import SafetensorsSource

log = logging.getLogger(__name__)

ROUTED = re.compile(r"^(.*)\.experts\.")  # a routed expert's tensor; shared_experts has no dot before "experts"
# config.json keys both checkpoints must agree on: the GGUF's shapes have to be this model's
SAME = ("hidden_size", "num_hidden_layers", "moe_intermediate_size", "n_routed_experts", "num_experts",
        "num_local_experts")


def family(model_type: str) -> str:
    """The GGUF architecture a model_type is stored as (llama.cpp's deepseek2 holds DeepSeek-V2, V3 and Kimi-K2)."""
    return "deepseek" if model_type in ("deepseek_v2", "deepseek_v3", "kimi_k2") else model_type


@dataclass
class HybridSource:
    """name -> tensor over a directory's safetensors and GGUF: routed experts from the GGUF, the rest from the
    safetensors (a tensor only one of them holds comes from that one)."""

    tensors: SafetensorsSource
    experts: GGUFSource
    path: Path

    def __post_init__(self):
        # layers whose routed experts the GGUF holds: all their names resolve there (stacked tensors are split
        # per expert by the loader), never to the safetensors' copy of the same experts
        self.gguf_layers = {m[1] for n in self.experts.names() if (m := ROUTED.match(n))}

    def source_of(self, name: str):
        """The checkpoint `name` is read from."""
        if (m := ROUTED.match(name)) and m[1] in self.gguf_layers:
            return self.experts
        return self.tensors if name in self.tensors else self.experts

    def __contains__(self, name: str) -> bool:
        return name in self.source_of(name)

    def names(self) -> list[str]:
        return [n for n in dict.fromkeys([*self.tensors.names(), *self.experts.names()]) if n in self]

    def info(self, name: str):
        return self.source_of(name).info(name)

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.source_of(name).get(name, dtype=dtype, device=device)

    def view(self, name: str):
        return self.source_of(name).view(name)

    def release(self, name: str) -> None:
        self.source_of(name).release(name)

    def fp8(self, name: str):
        """As SafetensorsSource.fp8, for the tensors the safetensors provide."""
        return self.tensors.fp8(name) if self.source_of(name) is self.tensors else None

    def raw(self, name: str):
        """As GGUFSource.raw, for the tensors the GGUF provides (ValueError for the others: no blocks)."""
        if self.source_of(name) is not self.experts:
            raise ValueError(f"{self.path}: tensor {name} comes from the safetensors, not from GGUF blocks")
        return self.experts.raw(name)

    def expert_blocks(self, prefix: str, proj_names: tuple[str, str, str], n_experts: int):
        return self.experts.expert_blocks(prefix, proj_names, n_experts)

    def close(self) -> None:
        self.tensors.close()
        self.experts.close()


def open_hybrid(path: Path, config: dict) -> HybridSource | None:
    """The directory's safetensors and GGUF as one source when it has both (None when it has no GGUF). A ConfigError
    names the files when the GGUF is not the same model as config.json or the directory holds several GGUF models."""
    ggufs = sorted(path.glob("*.gguf"))
    if not ggufs:
        return None
    parts = split_files(ggufs[0])
    if others := [g for g in ggufs if g not in parts]:
        raise ConfigError(f"{path}: several GGUF models here ({ggufs[0].name}, {others[0].name}); keep the one whose "
                          "routed experts should run")
    gconfig, experts, _ = open_gguf_source(ggufs[0])
    ours, theirs = config.get("model_type"), gconfig.get("model_type")
    if ours and theirs and family(ours) != family(theirs):
        raise ConfigError(f"{ggufs[0]}: a {theirs} model, but {path / 'config.json'} says {ours}: not a quant of "
                          "this model")
    for key in SAME:
        if key in config and key in gconfig and config[key] != gconfig[key]:
            raise ConfigError(f"{ggufs[0]}: {key} {gconfig[key]}, but {path / 'config.json'} says {config[key]}: "
                              "not a quant of this model")
    log.info("%s: routed experts from %s (its blocks), every other tensor from the safetensors", path, ggufs[0].name)
    return HybridSource(SafetensorsSource.open(path), experts, path)
