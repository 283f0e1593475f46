"""Shared pieces of every family: config parsing helpers and the family registry."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

# model_type (config.json) -> module under tandem.models; one file per family.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "kimi_k2": "deepseek",
}


class ConfigError(ValueError):
    """A model configuration that cannot be built; the message names the field."""


def family(model_type: str):
    """The module of a family, by its config.json `model_type`."""
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ConfigError(f"unknown architecture model_type={model_type!r}; tandem knows: {known}")
    return importlib.import_module(f"tandem.models.{FAMILIES[model_type]}")


def from_dict(cls, d: dict[str, Any], renames: dict[str, str] | None = None):
    """Build dataclass `cls` from a config dict, ignoring unknown keys (mlx-lm style)."""
    d = dict(d)
    for old, new in (renames or {}).items():
        if old in d and d.get(new) is None:
            d[new] = d[old]
    kwargs = {}
    for f in dataclasses.fields(cls):
        # an explicit null keeps the default, unless the default itself is None (an optional field)
        if f.name in d and (d[f.name] is not None or f.default is None):
            kwargs[f.name] = d[f.name]
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config.json lacks required field(s) {', '.join(missing)} for {cls.__name__}")
    return cls(**kwargs)


def rope_parameters(d: dict[str, Any]) -> dict[str, Any]:
    """One RoPE dict from both spellings: Hub `rope_theta` + `rope_scaling`, transformers 5 `rope_parameters`."""
    p = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    for k, v in scaling.items():
        p.setdefault(k, v)
    if "type" in p and "rope_type" not in p:
        p["rope_type"] = p.pop("type")
    p.setdefault("rope_type", "default")
    p.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    if p["rope_type"] not in ("default", "linear", "yarn", "llama3"):
        raise ConfigError(f"rope type {p['rope_type']!r} is not supported (default, linear, yarn, llama3)")
    return p


def check_positive(obj, *names: str) -> None:
    """Raise ConfigError naming the first field that is not a positive integer."""
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"config field {n}={v!r} must be a positive integer")
