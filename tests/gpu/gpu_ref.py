"""Helpers of the GPU operator tests: rules as YAML files, and the CPU reference with the weights a quantized GPU
model really computes with (its dequantized blocks), so a quantized model is checked to float precision."""

from __future__ import annotations

from pathlib import Path

import torch

import tandem
from tandem.ops.experts import ExpertsOp
from tandem.ops.linear import Linear

RTOL = 1e-4  # float32, as [A]: the GPU runs the same arithmetic in another order


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def write_rules(tmp_path: Path, text: str, name: str = "rules.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def dequantized_reference(path, llm) -> tandem.LLM:
    """The plain float32 CPU model of `path`, its experts and linears replaced by the dequantized weights of the
    GPU model `llm` (those are what its kernels compute with)."""
    ref = tandem.load(path, rules="none", dtype="float32", progress=False)
    with torch.no_grad():
        for name, m in llm.model.named_modules():
            if isinstance(m, ExpertsOp):
                backend = m.backends["generate"]
                if not hasattr(backend, "dequantized"):
                    continue
                experts = ref.model.get_submodule(name)
                for e, weights in enumerate(zip(*backend.dequantized())):
                    for proj, w in zip(experts.proj_names, weights):
                        getattr(experts[e], proj).weight.copy_(w.cpu())
            elif isinstance(m, Linear) and m.qweight is not None:
                ref.model.get_submodule(name).weight.copy_(m.dequantized_weight().cpu())
    return ref
