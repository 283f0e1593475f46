"""Fill a meta-device model from a weight source: each parameter materialized once, in its dtype, on its device.

Checkpoints name experts one by one (experts.7.up_proj.weight) or fused (experts.gate_up_proj [E, 2I, D],
experts.down_proj [E, D, I], as transformers 5 keeps them in memory); both resolve to the per-expert names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from tandem.weights.safetensors import MissingTensorError, WeightError

EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
# fused tensor name -> which per-expert projections it holds, in order along its fused dim
FUSED = {"gate_up_proj": ("gate", "up"), "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
         "w13_weight": ("gate", "up"), "w2_weight": ("down",)}
ROLE = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


@dataclass(frozen=True, slots=True)
class FusedSlice:
    """Expert e's part of a fused tensor: rows [lo, hi) of fused[e] (or of its transpose)."""

    fused: str
    e: int
    lo: int
    hi: int
    transposed: bool


def resolve_fused_expert(name: str, shape: tuple[int, ...], source) -> FusedSlice | None:
    """Where per-expert `name` (expected `shape` [out, in]) lives in a fused expert tensor, if anywhere."""
    m = EXPERT.match(name)
    if not m or m["proj"] not in ROLE:
        return None
    role, out_dim, in_dim = ROLE[m["proj"]], shape[0], shape[1]
    for fused, roles in FUSED.items():
        key = f"{m['prefix']}.{fused}"
        if role not in roles or key not in source:
            continue
        fshape = source.info(key).shape
        k = roles.index(role)
        if len(fshape) == 3 and fshape[1:] == (out_dim * len(roles), in_dim):
            return FusedSlice(key, int(m["e"]), k * out_dim, (k + 1) * out_dim, False)
        if len(fshape) == 3 and fshape[1:] == (in_dim, out_dim * len(roles)):
            return FusedSlice(key, int(m["e"]), k * out_dim, (k + 1) * out_dim, True)
        raise WeightError(f"tensor {key} has shape {list(fshape)}, which does not hold experts of "
                          f"[{out_dim}, {in_dim}] ({'+'.join(roles)})")
    return None


class FusedCache:
    """Maps the fused expert tensor being split, so E experts read it once and never copy it whole."""

    def __init__(self, source):
        self.source, self.name, self.tensor = source, None, None

    def get(self, s: FusedSlice, dtype, device) -> torch.Tensor:
        if s.fused != self.name:
            self.close()
            self.name, self.tensor = s.fused, self.source.view(s.fused)
        w = self.tensor[s.e]
        w = w.t()[s.lo : s.hi] if s.transposed else w[s.lo : s.hi]
        return w.to(device=device, dtype=dtype, copy=True).contiguous()

    def close(self) -> None:
        if self.name is not None:
            self.tensor = None
            self.source.release(self.name)
            self.name = None


def tensors_of(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(checkpoint name, owning module, attribute, tensor) for every parameter and persistent buffer."""
    for mod_name, mod in module.named_modules(prefix=prefix.rstrip(".")):
        for attr, p in mod._parameters.items():
            if p is not None:
                yield (f"{mod_name}.{attr}" if mod_name else attr), mod, attr, p
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{attr}" if mod_name else attr), mod, attr, b


def _origin(source, name: str) -> str:
    info = getattr(source, "info", None)
    try:
        return str(info(name).file) if info else "checkpoint"
    except KeyError:
        return "checkpoint"


def _find(source, name: str, shape: tuple, dtype, device, fused: FusedCache) -> torch.Tensor | None:
    if name in source:
        return source.get(name, dtype=dtype, device=device)
    if (s := resolve_fused_expert(name, shape, source)) is not None:
        return fused.get(s, dtype, device)
    return None


def load_tensor(source, name: str, shape: tuple, dtype, device, fused: FusedCache, tied: dict,
                aliases: tuple = ()) -> torch.Tensor:
    """Tensor `name` of `shape`: direct, from a fused experts tensor, under an alias of the family, or its tie."""
    candidates = [name] + [re.sub(pat, rep, name) for pat, rep in aliases] + ([tied[name]] if name in tied else [])
    for cand in dict.fromkeys(candidates):
        t = _find(source, cand, shape, dtype, device, fused)
        if t is not None:
            break
    else:
        raise MissingTensorError(getattr(source, "path", "checkpoint"), name, f" (shape {list(shape)})")
    if tuple(t.shape) != tuple(shape):
        where = _origin(source, name if name in source else tied.get(name, name))
        raise WeightError(f"{where}: tensor {name} has shape {list(t.shape)}, the config implies {list(shape)}")
    return t


def materialize(
    model: nn.Module,
    source,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    prefix: str = "",
    tied: dict[str, str] | None = None,
    aliases: tuple[tuple[str, str], ...] = (),
    progress: bool = True,
) -> None:
    """Replace every meta tensor of `model` by its checkpoint tensor (names from `prefix`), in place.

    Floating tensors become `dtype`; others keep theirs. `tied` maps a missing name to the one it shares;
    `aliases` are (regex, replacement) spellings a family's checkpoints may use instead.
    """
    entries = [e for e in tensors_of(model, prefix) if e[3].is_meta]
    total = sum(t.numel() * dtype.itemsize for *_, t in entries)
    fused = FusedCache(source)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", delay=1.0, disable=not progress, leave=False)
    with bar, torch.no_grad():
        for name, mod, attr, t in entries:
            want = dtype if t.is_floating_point() else t.dtype
            new = load_tensor(source, name, tuple(t.shape), want, device, fused, tied or {}, aliases)
            if attr in mod._parameters:
                mod._parameters[attr] = nn.Parameter(new, requires_grad=False)
            else:
                mod._buffers[attr] = new
            bar.update(new.numel() * dtype.itemsize)
    fused.close()
    for m in model.modules():  # computed buffers (RoPE frequencies) follow the weights
        for attr, b in m._buffers.items():
            if b is not None and attr in m._non_persistent_buffers_set and b.device != torch.device(device):
                m._buffers[attr] = b.to(device)
