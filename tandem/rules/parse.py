"""Read a rule file into a RuleSet, checking everything that can be checked without a model.

A rule file is a YAML list; each rule is
    match:   {name: regex searched in the dotted module name, class: model class (isinstance), layers: "a:b"}
    replace: {class: operator or "default", kwargs: {...}}
    recursive: true | false   (false: the matched module's children are not visited)
`layers` is tandem's own: a slice of decoder-layer indices whose ends may be percentages ("50%:").
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from tandem.ops.registry import BACKENDS, DEVICE_KWARGS, OPS
from tandem.rules import compat

RULE_KEYS = ("match", "replace", "recursive")
MATCH_KEYS = ("name", "class", "layers")
REPLACE_KEYS = ("class", "kwargs")
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
LAYER_END = re.compile(r"^(\d+%?)?$")


class RuleError(ValueError):
    """Rules that cannot be used; `errors` holds every message, each naming the rule, its line and the fix."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        more = f" (+{len(errors) - 1} more: `tandem rules explain` lists them)" if len(errors) > 1 else ""
        super().__init__(errors[0] + more)


@dataclass(slots=True)
class Rule:
    index: int  # 0-based, file order
    line: int  # 1-based line of the rule's `- match` item
    source: str  # file (or preset) it came from
    name: str | None = None
    pattern: re.Pattern | None = None
    match_class: str | None = None  # as written
    match_type: type | None = None  # the tandem model class it means
    match_family: str | None = None  # only in models of this family (models/<family>.py); None: any
    layers: tuple[str, str] | None = None  # (lo, hi) ends as written, resolved against the model
    replace_class: str = "default"  # as written
    op: str = "default"  # tandem operator
    kwargs: dict[str, Any] = field(default_factory=dict)  # device names normalized, kernels by tandem name
    recursive: bool = True
    lines: dict[str, int] = field(default_factory=dict)  # "replace.kwargs.out_device" -> line

    def where(self, key: str | None = None) -> str:
        line = self.lines.get(key, self.line) if key else self.line
        return f"{self.source}: rule {self.index} (line {line})"


@dataclass(slots=True)
class RuleSet:
    rules: list[Rule]
    source: str
    warnings: list[str] = field(default_factory=list)


def normalize_device(d: Any) -> str | None:
    """'cuda' -> 'cuda:0'; None if `d` is not a device name."""
    if not isinstance(d, str) or not DEVICE.match(d.strip()):
        return None
    d = d.strip()
    return "cuda:0" if d == "cuda" else d


def _lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    out = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            out[key] = k.start_mark.line + 1
            out.update(_lines(v, key))
    return out


def _import(path: str):
    mod, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError):
        return None


def resolve_match_class(name: str) -> tuple[type, str | None] | str:
    """(tandem class, family) for a match.class, or an error message."""
    entry = compat.MATCH_CLASSES.get(name)
    if entry is None and "." not in name:
        hits = {compat.MATCH_CLASSES[k] for k in compat.by_short_name(compat.MATCH_CLASSES, name)}
        if len(hits) == 1:
            entry = hits.pop()
    if entry is not None:
        return _import(entry[0]), entry[1]
    if name.startswith(compat.KT):
        return f"match.class {name} has no tandem equivalent yet; match by name instead, or use a tandem class"
    obj = _import(name) if name.startswith(("tandem.", "torch.")) else None
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj, None
    return (f"match.class {name} is not a known model class; use a KTransformers modeling class, "
            "torch.nn.Linear, or a tandem.models class")


def resolve_operator(name: str) -> str | tuple[None, str]:
    """The tandem operator a replace.class names, or (None, error message)."""
    if name == "default" or name in OPS:
        return name
    if name in compat.OPERATORS:
        return compat.OPERATORS[name]
    if name.startswith("tandem.ops."):  # tandem.ops.Experts, tandem.ops.RMSNorm, ...
        last = name.rsplit(".", 1)[-1].lower()
        last = {"rmsnorm": "norm"}.get(last, last)
        if last in OPS:
            return last
    if "." not in name:
        hits = {compat.OPERATORS[k] for k in compat.by_short_name(compat.OPERATORS, name)}
        if len(hits) == 1:
            return hits.pop()
    known = ", ".join(sorted(OPS))
    if name.startswith(compat.KT):
        return None, f"replace.class {name} has no tandem equivalent yet; use one of: {known}"
    return None, f"replace.class {name} is not a known operator; use one of: {known}, or a KTransformers operator"


def resolve_backend(name: Any, op: str) -> str | tuple[None, str]:
    if not isinstance(name, str):
        return None, f"expected a kernel name, got {name!r}"
    b = compat.BACKENDS.get(name, name)
    allowed = OPS[op].backends
    if b in allowed:
        return b
    if b in BACKENDS or name in compat.BACKENDS:
        return None, f"{name} is a kernel of another operator; {op} runs: {', '.join(allowed) or 'no kernel choice'}"
    kt = [k for k, v in compat.BACKENDS.items() if v in allowed]
    return None, f"unknown kernel {name!r}; {op} runs: {', '.join([*allowed, *kt]) or 'no kernel choice'}"


def _check_layers(spec: Any) -> tuple[str, str] | None:
    if not isinstance(spec, str) or spec.count(":") != 1:
        return None
    lo, hi = (s.strip() for s in spec.split(":"))
    return (lo, hi) if LAYER_END.match(lo) and LAYER_END.match(hi) else None


def _parse_rule(i: int, item: Any, node: yaml.Node, source: str, errors: list[str]) -> Rule | None:
    rule = Rule(i, node.start_mark.line + 1, source, lines=_lines(node))

    def err(key: str | None, msg: str) -> None:
        errors.append(f"{rule.where(key)}: {msg}")

    if not isinstance(item, dict):
        err(None, "a rule must be a mapping with match and replace")
        return None
    for k in item:
        if k not in RULE_KEYS:
            err(str(k), f"unknown key {k!r}; a rule has {', '.join(RULE_KEYS)}")
    match, replace = item.get("match"), item.get("replace")
    if not isinstance(match, dict) or not any(k in match for k in MATCH_KEYS):
        err("match", "match needs at least one of name, class, layers")
        match = {}
    for k in match:
        if k not in MATCH_KEYS:
            err(f"match.{k}", f"unknown key match.{k}; match has {', '.join(MATCH_KEYS)}")
    if "name" in match:
        rule.name = match["name"]
        try:
            rule.pattern = re.compile(str(rule.name))
        except re.error as e:
            err("match.name", f"invalid regular expression {rule.name!r}: {e.msg} at position {e.pos}")
    if "class" in match:
        rule.match_class = str(match["class"])
        got = resolve_match_class(rule.match_class)
        if isinstance(got, str):
            err("match.class", got)
        else:
            rule.match_type, rule.match_family = got
    if "layers" in match:
        rule.layers = _check_layers(match["layers"])
        if rule.layers is None:
            err("match.layers", f"layers {match['layers']!r} must be a slice like \"0:30\", \"30:\" or \"50%:\"")
    if not isinstance(replace, dict):
        err("replace" if "replace" in item else None, "replace must be a mapping with class (and kwargs)")
        replace = {}
    for k in replace:
        if k not in REPLACE_KEYS:
            err(f"replace.{k}", f"unknown key replace.{k}; replace has {', '.join(REPLACE_KEYS)}")
    rule.replace_class = str(replace.get("class", "default"))
    op = resolve_operator(rule.replace_class)
    if isinstance(op, tuple):
        err("replace.class", op[1])
        op = None
    rule.op = op or "default"
    kwargs = replace.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        err("replace.kwargs", "replace.kwargs must be a mapping")
        kwargs = {}
    if op is not None:
        _parse_kwargs(rule, kwargs, err)
    if "recursive" in item:
        if not isinstance(item["recursive"], bool):
            err("recursive", f"recursive must be true or false, not {item['recursive']!r}")
        else:
            rule.recursive = item["recursive"]
    return rule


def _parse_kwargs(rule: Rule, kwargs: dict, err) -> None:
    spec = OPS[rule.op]
    allowed = [k for k in DEVICE_KWARGS if spec.backends or not k.endswith("_op")] + sorted(spec.kwargs)
    for k, v in kwargs.items():
        key = f"replace.kwargs.{k}"
        if k not in allowed:
            err(key, f"unknown kwarg {k!r} for {rule.op}; it takes {', '.join(allowed)}")
        elif k.endswith("_device"):
            d = normalize_device(v)
            if d is None:
                err(key, f"{k}: {v!r} is not a device; write cpu, cuda or cuda:N")
            rule.kwargs[k] = d
        elif k.endswith("_op"):
            b = resolve_backend(v, rule.op)
            if isinstance(b, tuple):
                err(key, f"{k}: {b[1]}")
            else:
                rule.kwargs[k] = b
        elif k == "transfer_map":
            rule.kwargs[k] = _parse_transfer_map(v, lambda m, key=key: err(key, m))
        else:
            rule.kwargs[k] = v


def _parse_transfer_map(v: Any, err) -> dict[int | str, str]:
    if not isinstance(v, dict):
        err("transfer_map must map layer indices to devices, e.g. {30: \"cuda:1\"}")
        return {}
    out = {}
    for k, d in v.items():
        if isinstance(k, bool) or not (isinstance(k, int) and k >= 0 or isinstance(k, str) and
                                       re.match(r"^\d+%?$", k.strip())):
            err(f"transfer_map key {k!r} must be a layer index (or a percentage of the layers, \"50%\")")
            continue
        dev = normalize_device(d)
        if dev is None:
            err(f"transfer_map {k}: {d!r} is not a device; write cpu, cuda or cuda:N")
            continue
        out[int(k) if isinstance(k, str) and not k.endswith("%") else k] = dev
    return out


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Parse rule-file text; raises RuleError with every problem found (YAML errors with line and column)."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise RuleError([f"{where}: invalid YAML: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise RuleError([f"{source}: invalid YAML: {e}"]) from None
    if data is None:
        raise RuleError([f"{source}: no rules (the file is empty); a rule file is a YAML list of rules"])
    if not isinstance(data, list):
        raise RuleError([f"{source}:{node.start_mark.line + 1}: a rule file is a YAML list of rules (`- match: ...`), "
                         f"not a {type(data).__name__}"])
    errors: list[str] = []
    rules = [_parse_rule(i, item, n, source, errors) for i, (item, n) in enumerate(zip(data, node.value))]
    if errors:
        raise RuleError(errors)
    return RuleSet([r for r in rules if r is not None], source)


def read_rules(path: str | Path) -> RuleSet:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RuleError([f"{path}: cannot read the rule file ({e.strerror})"]) from None
    return parse_rules(text, str(path))
