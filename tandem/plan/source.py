"""What a model holds, without reading a weight: every stored tensor's name, shape, format and bytes, from the
safetensors or GGUF headers, or from a synth preset's shapes (no file written), and the model built on meta.

Names are Hugging Face's (GGUF names are mapped on read), so a tensor belongs to the module whose name prefixes
it: `model.layers.3.mlp.experts.gate_up_proj` (fused) and `...experts.7.up_proj.weight` both to `...experts`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tandem.models import build_model
from tandem.weights.loader import tensors_of
from tandem.weights.safetensors import DTYPE_NAMES


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """One tensor as the checkpoint stores it."""

    name: str
    shape: tuple[int, ...]
    format: str  # "BF16", "F8_E4M3", "Q4_K", ...
    nbytes: int


@dataclass
class ModelSource:
    """A model to plan: its config, its module tree on meta, and its stored tensors."""

    name: str  # what the user named (a path or a preset)
    config: dict
    model: nn.Module  # built on meta: names and shapes
    tensors: dict[str, StoredTensor]
    kind: str  # "safetensors", "gguf", "hybrid" (safetensors + a GGUF's routed experts) or "preset"
    path: Path | None = None  # None for a preset
    preset: tuple[str, int | None] | None = None  # (preset name, --layers) when kind == "preset"
    _owners: dict[str, int] | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    def file_bytes(self) -> int:
        """All stored tensor bytes (what the files hold, headers aside)."""
        return sum(t.nbytes for t in self.tensors.values())

    def file_bytes_by_module(self) -> dict[str, int]:
        """module name -> bytes of the stored tensors it owns directly (fused experts to their experts module)."""
        if self._owners is None:
            modules = {n for n, _ in self.model.named_modules()}
            owners: dict[str, int] = {}
            for t in self.tensors.values():
                owner = t.name
                while owner and owner not in modules:
                    owner = owner.rpartition(".")[0]
                owners[owner] = owners.get(owner, 0) + t.nbytes
            self._owners = owners
        return self._owners

    def largest_tensor(self) -> int:
        """Bytes of the largest stored tensor: the most a load maps at once (pages are dropped after each)."""
        return max((t.nbytes for t in self.tensors.values()), default=0)


def _preset_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, StoredTensor]:
    fmt = DTYPE_NAMES[dtype]
    return {name: StoredTensor(name, tuple(t.shape), fmt, math.prod(t.shape) * dtype.itemsize)
            for name, _, _, t in tensors_of(model)}


def open_source(spec: str | Path, layers: int | None = None) -> ModelSource:
    """A model directory, a .gguf file, or a synth preset name (`deepseek-v3`; `layers` cuts its depth)."""
    from tandem.synth import PRESETS, preset_config

    path = Path(spec)
    if not path.exists() and str(spec) in PRESETS:
        config = preset_config(str(spec), layers)
        model = build_model(config)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[config["dtype"]]
        return ModelSource(str(spec), config, model, _preset_tensors(model, dtype), "preset",
                           preset=(str(spec), layers))
    if layers is not None:
        raise ValueError(f"--layers cuts a synth preset's depth; {spec} is a checkpoint")
    if path.suffix == ".gguf" and path.is_file():
        from tandem.weights.gguf import open_gguf_source

        config, source, _ = open_gguf_source(path)
        tensors = _gguf_tensors(source, source.entries)
        source.close()
        return ModelSource(str(spec), config, build_model(config), tensors, "gguf", path)
    from tandem.checkpoint import read_config
    from tandem.weights import SafetensorsSource
    from tandem.weights.hybrid import open_hybrid

    if not path.exists():
        known = ", ".join(sorted(PRESETS))
        raise FileNotFoundError(f"{spec}: no such model directory or .gguf file, and not a synth preset ({known})")
    config = read_config(path)
    hybrid = open_hybrid(path, config)
    source = hybrid.tensors if hybrid else SafetensorsSource.open(path)
    infos = {n: i for n, i in source.infos.items() if hybrid is None or hybrid.source_of(n) is source}
    tensors = {n: StoredTensor(n, i.shape, DTYPE_NAMES[i.dtype], i.nbytes) for n, i in infos.items()}
    if hybrid:  # the routed experts as the GGUF stores them, the rest as the safetensors do
        gguf = hybrid.experts
        tensors |= _gguf_tensors(gguf, [n for n in gguf.entries if hybrid.source_of(n) is gguf])
    (hybrid or source).close()
    return ModelSource(str(spec), config, build_model(config), tensors, "hybrid" if hybrid else "safetensors", path)


def _gguf_tensors(source, names) -> dict[str, StoredTensor]:
    """StoredTensor of each of `names` in a GGUF source, in its stored type."""
    entries = {n: source.entries[n] for n in names}
    return {n: StoredTensor(n, tuple(e.shape), e.ggml_type, e.nbytes) for n, e in entries.items()}
