"""What every operator shares: its placement (OpConfig), the load context, moving tensors between devices,
and loading a module's own tensors from the weight source onto its device.

Operators that keep the model's module (attention, norms, the MoE block, `default`) are the module itself with
`DeviceOp` mixed under its class: same names, same forward, inputs moved to its device and the result to
out_device. Operators with their own weight layout (experts, linear) are new modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tandem.weights.loader import FusedCache, load_tensor


@dataclass(slots=True)
class OpConfig:
    """Where one operator runs; built by the rule layer from a rule's kwargs."""

    name: str  # module name in the tree, e.g. model.layers.3.mlp.experts
    op: str  # operator name in the registry
    generate_device: str = "cpu"
    prefill_device: str = "cpu"
    out_device: str = "cpu"
    generate_op: str | None = None  # backend name
    prefill_op: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # operator-specific


class RunState:
    """Per-model state the model operator sets on every forward: which phase the batch is in."""

    __slots__ = ("phase",)

    def __init__(self):
        self.phase = "generate"  # "prefill" when any sequence brings more than one new token


@dataclass
class LoadContext:
    source: Any  # WeightSource: name -> tensor
    dtype: torch.dtype
    tied: dict[str, str] = field(default_factory=dict)
    state: RunState = field(default_factory=RunState)
    placed: set[str] = field(default_factory=set)  # modules placed by their own rule; others load them
    aliases: tuple[tuple[str, str], ...] = ()  # (regex, replacement) spellings the family's checkpoints use
    said: set[str] = field(default_factory=set)  # log lines already written for this model (each said once)
    _fused: FusedCache | None = None

    @property
    def fused(self) -> FusedCache:
        if self._fused is None:
            self._fused = FusedCache(self.source)
        return self._fused

    def load(self, name: str, shape: tuple[int, ...], device: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return load_tensor(self.source, name, tuple(shape), dtype or self.dtype, device, self.fused, self.tied,
                           self.aliases)

    def close(self) -> None:
        if self._fused is not None:
            self._fused.close()


def to_device(x: Any, device: str | torch.device) -> Any:
    """Tensors (also inside tuples and lists) moved to `device`; anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def load_own_tensors(module: nn.Module, name: str, device: str, ctx: LoadContext) -> None:
    """Fill the meta tensors of `module` and of its descendants that no rule placed apart, on `device`."""

    def visit(mod: nn.Module, prefix: str) -> None:
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None:
                continue
            full = f"{prefix}.{attr}" if prefix else attr
            if attr in mod._non_persistent_buffers_set:
                mod._buffers[attr] = t.to(device)  # computed (RoPE frequencies), not loaded
            elif t.is_meta:
                want = ctx.dtype if t.is_floating_point() else t.dtype
                new = ctx.load(full, tuple(t.shape), device, want)
                if attr in mod._parameters:
                    mod._parameters[attr] = nn.Parameter(new, requires_grad=False)
                else:
                    mod._buffers[attr] = new
        for child_name, child in mod._modules.items():
            child_full = f"{prefix}.{child_name}" if prefix else child_name
            if child is not None and child_full not in ctx.placed:
                visit(child, child_full)

    with torch.no_grad():
        visit(module, name)


class DeviceOp(nn.Module):
    """Mixed under a model module's own class: runs it on its device, hands the result to out_device."""

    op_config: OpConfig
    run_state: RunState

    def forward(self, *args, **kwargs):
        dev = self.op_config.generate_device
        args = tuple(to_device(a, dev) for a in args)
        out = super().forward(*args, **kwargs)
        return to_device(out, self.op_config.out_device)


_SWAPPED: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    """`module` with `mixin` put in front of its class (names, children and forward kept)."""
    base = type(module)
    if isinstance(module, mixin):
        base = base.__mro__[2]
    key = (mixin, base)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"{mixin.__name__}[{base.__name__}]", (mixin, base), {})
    module.__class__ = _SWAPPED[key]
    module.op_config, module.run_state = cfg, ctx.state
    return module


def has_own_tensors(module: nn.Module) -> bool:
    return any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))


def build_device_op(module: nn.Module, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    """The operator that keeps a module as it is and only places it (moe, mlp, `default`).

    A `default` container with no tensors of its own (a decoder layer, a ModuleList) is left untouched: its
    children run where they are placed, and moving its input would only add a copy. A `default` RMSNorm or
    RotaryEmbedding becomes the norm / rope operator (fused kernels on a GPU, the same results on the CPU); a
    `default` grouped-query attention decodes with the paged Triton kernel on a GPU (tandem.ops.attention).
    """
    if cfg.op == "default":
        from tandem.ops.registry import OPS, resolve  # imported here: the registry's operators import this module

        for spec in (OPS["norm"], OPS["rope"]):
            if isinstance(module, spec.targets):
                return resolve(spec.build)(module, cfg, ctx)
        if isinstance(module, OPS["attention"].targets):
            from tandem.ops.attention import place_default

            return place_default(module, cfg, ctx)
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    if cfg.op == "default" and not has_own_tensors(module):
        return module
    return swap_class(module, DeviceOp, cfg, ctx)
