"""`explain`: a placement from config.json alone (no weights, no GPU), as JSON or as a table that folds the
layers a rule treats alike into one row (model.layers.{1-29}.mlp.experts)."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from tandem.checkpoint import read_config
from tandem.models import build_model
from tandem.models.base import ConfigError
from tandem.rules.parse import RuleSet
from tandem.rules.plan import Placement, plan

LAYER_IN_NAME = re.compile(r"^model\.layers\.(\d+)(?=\.|$)")


def read_model_config(path: str | Path) -> dict:
    """config.json of a model directory, or a config.json file itself."""
    path = Path(path)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
    return read_config(path)


@lru_cache(maxsize=4)
def _model(config_json: str):
    # a 60-layer DeepSeek has ~30k modules: built once per config, whatever the rules explained against it
    return build_model(json.loads(config_json))


def explain(config: dict, rules: RuleSet, devices: list[str] | None = None, default_device: str | None = None,
            dtype: torch.dtype | None = None, ctx_tokens: int = 4096) -> Placement:
    """The placement `rules` give the model `config` describes; errors and warnings inside, nothing raised."""
    from tandem.llm import parse_dtype  # the checkpoint's dtype rule, shared with load()

    model = _model(json.dumps(config, sort_keys=True))
    return plan(model, rules, config["model_type"], devices, default_device, parse_dtype(dtype, config), ctx_tokens)


def _span(ids: list[int]) -> str:
    ids = sorted(ids)
    if len(ids) == 1:
        return str(ids[0])
    runs, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else str(a))
            start = b
    return "{" + ",".join(runs) + "}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def render(p: Placement) -> str:
    """The human table: one row per group of layers placed alike."""
    groups: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for m in p.values():
        match = LAYER_IN_NAME.match(m.module)
        layer = int(match.group(1)) if match else -1
        generic = LAYER_IN_NAME.sub("model.layers.{}", m.module) if match else m.module
        kernels = "" if m.generate_op is None else (
            m.generate_op if m.prefill_op == m.generate_op else f"{m.generate_op} / prefill {m.prefill_op}")
        dev = m.generate_device if m.prefill_device == m.generate_device else (
            f"{m.generate_device} / prefill {m.prefill_device}")
        if m.out_device != m.generate_device:
            dev += f" -> {m.out_device}"
        key = (generic, "-" if m.rule is None else f"{m.rule} (line {m.line})", m.op, dev, kernels)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(layer)
    rows = [("module", "rule", "operator", "device", "kernel")]
    for key in order:
        layers = [i for i in groups[key] if i >= 0]
        name = key[0].replace("{}", _span(layers)) if layers else key[0]
        rows.append((name, *key[1:]))
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(4)]
    lines = [f"rules: {p.source}    devices: {', '.join(p.devices)}", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    route = ", ".join(f"layer {i} -> {d}" for i, d in sorted(p.transfer_map.items()))
    lines += ["", f"hidden state: enters layer 0 on {p.start_device}" + (f"; {route}" if route else "")]
    lines += ["", "memory:"] + [f"  {d:8} weights {_gib(b['weights']):>12}   kv cache {_gib(b['kv']):>10}"
                                for d, b in p.bytes.items()]
    lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)
