"""Rules + a model built on meta -> Placement: for every module the rule that won, its operator and devices;
the hidden state's route between devices (transfer_map); the bytes each device will hold. Pure: no weights.

Matching is KTransformers': modules are visited top-down from the root's children; for each, the rules are
tried in file order and the first that matches wins; `recursive: false` stops the descent below it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tandem.models.attention import Attention
from tandem.models.base import FAMILIES
from tandem.models.deepseek import MLAttention
from tandem.models.transformer import DecoderModel
from tandem.ops.base import OpConfig, has_own_tensors
from tandem.ops.registry import BACKENDS, OPS
from tandem.rules.parse import Rule, RuleSet

LAYER = re.compile(r"^model\.layers\.(\d+)(?:\.|$)")


@dataclass(slots=True)
class ModulePlacement:
    """Where one module runs: the rule that placed it, its operator, devices and kernels."""

    module: str
    module_class: str  # the model's class (MLAttention, Experts, Linear, ...)
    op: str  # operator (tandem.ops registry name) or "default"
    generate_device: str
    prefill_device: str
    out_device: str
    generate_op: str | None = None
    prefill_op: str | None = None
    rule: int | None = None  # 0-based index in the file; None: no rule matched
    line: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # operator-specific
    recursive: bool = True
    own_tensors: bool = False

    def config(self) -> OpConfig:
        return OpConfig(self.module, self.op, self.generate_device, self.prefill_device, self.out_device,
                        self.generate_op, self.prefill_op, dict(self.kwargs))

    def as_json(self) -> dict:
        return {"module": self.module, "rule": self.rule, "class": self.op, "module_class": self.module_class,
                "generate_device": self.generate_device, "prefill_device": self.prefill_device,
                "generate_op": self.generate_op, "prefill_op": self.prefill_op, "out_device": self.out_device}


@dataclass
class Placement(Mapping):
    """module name -> ModulePlacement, plus the route of the hidden state and the bytes per device."""

    modules: dict[str, ModulePlacement]
    transfer_map: dict[int, str]  # layer -> device the hidden state moves to before it (given + inferred)
    start_device: str  # where the hidden state enters layer 0
    devices: list[str]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> {"weights": n, "kv": n}
    source: str = ""

    def __getitem__(self, name: str) -> ModulePlacement:
        return self.modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def as_json(self) -> dict:
        return {"modules": [m.as_json() for m in self.modules.values()],
                "transfer_map": {str(k): v for k, v in sorted(self.transfer_map.items())},
                "bytes": self.bytes, "errors": self.errors, "warnings": self.warnings}


def available_devices() -> list[str]:
    """This machine's devices: cpu and every CUDA device torch sees."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(n))]


def _layer_of(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m.group(1)) if m else None


def _layer_end(s: str, n: int, default: int) -> int:
    if not s:
        return default
    return round(n * int(s[:-1]) / 100) if s.endswith("%") else int(s)


class _Planner:
    def __init__(self, model: nn.Module, rules: RuleSet, family: str, devices: list[str], default_device: str):
        self.model, self.rules, self.family = model, rules, family
        self.devices, self.default = devices, default_device
        self.n_layers = len(model.model.layers) if isinstance(getattr(model, "model", None), DecoderModel) else 0
        self.modules: dict[str, ModulePlacement] = {}
        self.hits = [0] * len(rules.rules)
        self.shadowed: list[set[int]] = [set() for _ in rules.rules]
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self._said: set[tuple] = set()
        self.layer_ranges = [(_layer_end(r.layers[0], self.n_layers, 0), _layer_end(r.layers[1], self.n_layers,
                              self.n_layers)) if r.layers else None for r in rules.rules]

    def error(self, key: tuple, msg: str) -> None:
        """One message per (rule, problem), not one per module: 60 layers make one mistake, not 60."""
        if key not in self._said:
            self._said.add(key)
            self.errors.append(msg)

    def matches(self, rule: Rule, mod: nn.Module, name: str) -> bool:
        if rule.match_type is not None:
            if not isinstance(mod, rule.match_type) or rule.match_family not in (None, self.family):
                return False
        if rule.pattern is not None and rule.pattern.search(name) is None:
            return False
        if rule.layers is not None:
            layer = _layer_of(name)
            lo, hi = self.layer_ranges[rule.index]
            if layer is None or not lo <= layer < hi:
                return False
        return True

    def visit(self, mod: nn.Module, name: str) -> None:
        chosen = None
        for rule in self.rules.rules:
            if self.matches(rule, mod, name):
                if chosen is None:
                    chosen = rule
                    self.hits[rule.index] += 1
                else:
                    self.shadowed[rule.index].add(chosen.index)
        self.modules[name] = self.place(mod, name, chosen)
        if chosen is None or chosen.recursive:
            for child_name, child in mod._modules.items():
                if child is not None:
                    self.visit(child, f"{name}.{child_name}")

    def place(self, mod: nn.Module, name: str, rule: Rule | None) -> ModulePlacement:
        kw = dict(rule.kwargs) if rule else {}
        op = rule.op if rule else "default"
        if op == "default" and isinstance(mod, DecoderModel):
            op = "model"  # the decoder stack always runs the model operator: it moves the hidden state
        spec = OPS[op]
        if rule and spec.targets and not isinstance(mod, spec.targets):
            self.error((rule.index, "target"), f"{rule.where('replace.class')}: {rule.replace_class} replaces "
                       f"{spec.target_doc}, but it matched {name} ({type(mod).__name__}); narrow match.name "
                       "or add match.class")
        gen = kw.pop("generate_device", None) or self.default
        pre = kw.pop("prefill_device", None) or gen
        out = kw.pop("out_device", None) or gen
        gop, pop = kw.pop("generate_op", None), kw.pop("prefill_op", None)
        if spec.backends:
            gop = gop or spec.default_backend(gen)
            pop = pop or (gop if gop and BACKENDS[gop].runs_on(pre) else spec.default_backend(pre))
        p = ModulePlacement(name, type(mod).__name__, op, gen, pre, out, gop, pop,
                            rule.index if rule else None, rule.line if rule else None, kw,
                            rule.recursive if rule else True, has_own_tensors(mod))
        self.check_devices(p, rule, spec)
        return p

    def check_devices(self, p: ModulePlacement, rule: Rule | None, spec) -> None:
        where = rule.where if rule else (lambda key=None: f"{p.module} (no rule: default device)")
        for key, dev in (("generate_device", p.generate_device), ("prefill_device", p.prefill_device),
                         ("out_device", p.out_device)):
            if dev not in self.devices:
                self.error((rule.index if rule else None, key, dev), f"{where(f'replace.kwargs.{key}')}: {key} "
                           f"{dev} is not a device here (devices: {', '.join(self.devices)}); change it, or name "
                           "the devices to plan for with --devices")
        for key, b, dev in (("generate_op", p.generate_op, p.generate_device),
                            ("prefill_op", p.prefill_op, p.prefill_device)):
            if b is None and spec.backends:
                self.error((rule.index if rule else None, key), f"{where(f'replace.kwargs.{key}')}: {spec.name} "
                           f"has no kernel that runs on {dev}; choose one of {', '.join(spec.backends)}")
            elif b is not None and not BACKENDS[b].runs_on(dev):
                self.error((rule.index if rule else None, key, b), f"{where(f'replace.kwargs.{key}')}: {b} cannot "
                           f"run on {dev} (it runs on {', '.join(BACKENDS[b].devices)}); change {key} or the device")
        if p.prefill_device != p.generate_device and not spec.phases_apart:
            self.error((rule.index if rule else None, "phases"), f"{where('replace.kwargs.prefill_device')}: "
                       f"{spec.name} runs prefill and generate on one device, but prefill_device is "
                       f"{p.prefill_device} and generate_device {p.generate_device}; make them equal")

    # ------------------------------------------------------------------ the hidden state's route

    def route(self) -> tuple[dict[int, str], str]:
        model_p = self.modules.get("model")
        given: dict[int, str] = {}
        if model_p is not None:
            for k, dev in (model_p.kwargs.get("transfer_map") or {}).items():
                i = _layer_end(k, self.n_layers, 0) if isinstance(k, str) else k
                if i >= self.n_layers:
                    self.error(("transfer_map", k), f"{self._rule_where(model_p, 'replace.kwargs.transfer_map')}: "
                               f"transfer_map layer {k} does not exist (the model has {self.n_layers} layers)")
                    continue
                given[i] = dev
                if dev not in self.devices:
                    self.error(("transfer_map", dev), f"{self._rule_where(model_p, 'replace.kwargs.transfer_map')}"
                               f": transfer_map device {dev} is not a device here ({', '.join(self.devices)})")
        transfers, inferred, stream = {}, {}, []
        for i in range(self.n_layers):
            attn = self.modules.get(f"model.layers.{i}.self_attn")
            here = attn.generate_device if attn else self.default
            if i in given:
                s = given[i]
            elif i == 0:
                s = here
            elif here != stream[-1]:
                s = inferred[i] = here
            else:
                s = stream[-1]
            if i > 0 and (i in given or s != stream[-1]):
                transfers[i] = s
            stream.append(s)
        if inferred:
            spell = ", ".join(f'{i}: "{d}"' for i, d in inferred.items())
            self.warnings.append(f"the layers change device without a transfer_map entry; tandem moves the hidden "
                                 f"state there (say so on the ^model$ rule: transfer_map: {{{spell}}})")
        self.check_layers(stream, given)
        return transfers, stream[0] if stream else self.default

    def _rule_where(self, p: ModulePlacement, key: str | None = None) -> str:
        if p.rule is None:
            return f"{p.module} (no rule: default device {self.default})"
        return self.rules.rules[p.rule].where(key)

    def check_layers(self, stream: list[str], given: dict[int, str]) -> None:
        isolated: list[str] = []
        for name, p in self.modules.items():
            i = _layer_of(name)
            if i is None or i >= len(stream) or any(name.startswith(x + ".") for x in isolated[-1:]):
                continue
            if OPS[p.op].isolated:
                isolated.append(name)
                parent = self.modules.get(name.rsplit(".", 1)[0])
                want = parent.generate_device if parent else stream[i]
                if p.out_device != want:
                    where = self._rule_where(p, "replace.kwargs.out_device")
                    self.error((p.rule, "out", p.out_device, want), f"{where}: out_device {p.out_device}, but "
                               f"{parent.module if parent else 'its layer'} adds the "
                               f"result on {want} (e.g. {name}); set out_device: \"{want}\"")
                continue
            if p.op == "default" and not p.own_tensors:
                continue  # a container: its children run where they are placed
            s = stream[i]
            why = "transfer_map" if any(k <= i for k in given) else "its attention"
            for key, dev in (("generate_device", p.generate_device), ("out_device", p.out_device)):
                if dev != s:
                    verb = "runs" if key == "generate_device" else "hands its output"
                    self.error((p.rule, key, dev, s), f"{self._rule_where(p, f'replace.kwargs.{key}')}: {name} "
                               f"{verb} on {dev}, but layer {i}'s "
                               f"hidden state is on {s} ({why}); put the layer on one device, or move the hidden "
                               "state with the model rule's transfer_map")
                    break

    # ------------------------------------------------------------------ memory

    def _held_weight(self, name: str, mod: nn.Module) -> int | None:
        from tandem.ops.linear import held_weight_bytes

        p = self.modules.get(name)
        if p is None or not isinstance(mod, nn.Linear):
            return None
        try:
            return held_weight_bytes(mod, p.generate_op, p.prefill_op, p.kwargs, name)
        except (KeyError, ValueError):  # a weight_format the op cannot hold: the load says so; count the dtype
            return None

    def bytes(self, dtype: torch.dtype, ctx_tokens: int) -> dict[str, dict[str, int]]:
        out = {d: {"weights": 0, "kv": 0} for d in self.devices}

        def owner(name: str) -> ModulePlacement | None:
            while name:
                if name in self.modules:
                    return self.modules[name]
                name = name.rpartition(".")[0]
            return None

        for name, mod in self.model.named_modules():
            p = owner(name)
            if p is None:
                continue
            dev = out.setdefault(p.generate_device, {"weights": 0, "kv": 0})
            held = self._held_weight(name, mod)  # a linear on linear.marlin / linear.fp8: its block bytes
            for key, t in (*mod._parameters.items(), *mod._buffers.items()):
                if t is not None:
                    dev["weights"] += held if held is not None and key == "weight" else \
                        t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
            if isinstance(mod, MLAttention):
                per_token = mod.a.kv_lora_rank + mod.a.qk_rope_head_dim
            elif isinstance(mod, Attention):
                per_token = 2 * mod.n_kv_heads * mod.head_dim
            else:
                continue
            dev["kv"] += per_token * dtype.itemsize * ctx_tokens
        return out


def plan(model: nn.Module, rules: RuleSet, family: str, devices: list[str] | None = None,
         default_device: str | None = None, dtype: torch.dtype = torch.bfloat16, ctx_tokens: int = 4096) -> Placement:
    """Place every module of `model` (built on meta) by `rules`; problems land in .errors / .warnings.

    family: the model's family module (models/<family>.py) or its config model_type. devices: those to plan for
    (default: this machine's). default_device: for modules no rule matches (default: cuda:0 if present, else cpu).
    """
    family = FAMILIES.get(family, family)
    devices = list(devices or available_devices())
    default = default_device or ("cuda:0" if "cuda:0" in devices else "cpu")
    pl = _Planner(model, rules, family, devices, default)
    if default not in devices:
        pl.errors.append(f"default device {default} is not one of {', '.join(devices)}")
    for child_name, child in model._modules.items():
        if child is not None:
            pl.visit(child, child_name)
    transfers, start = pl.route()
    for r in rules.rules:
        if pl.hits[r.index]:
            continue
        if pl.shadowed[r.index]:
            first = sorted(pl.shadowed[r.index])
            lines = ", ".join(f"{i} (line {rules.rules[i].line})" for i in first)
            pl.warnings.append(f"{r.where()}: matches no module: rule {lines} took every module it matches first; "
                               "move it above, if it should win")
        elif r.match_family not in (None, family):
            pl.warnings.append(f"{r.where('match.class')}: matches no module: {r.match_class} is a {r.match_family} "
                               f"class and this is a {family} model")
        else:
            pl.warnings.append(f"{r.where()}: matches no module of this model; check match.name and match.class")
    return Placement(pl.modules, transfers, start, devices, pl.errors, pl.warnings,
                     pl.bytes(dtype, ctx_tokens), rules.source)
