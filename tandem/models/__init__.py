"""Model families built from config.json on the meta device, with Hugging Face module and parameter names."""

from __future__ import annotations

import torch

from tandem.models.attention import Batch
from tandem.models.base import FAMILIES, ConfigError, family
from tandem.models.transformer import CausalLM


def parse_args(config: dict):
    """The family's ModelArgs for a config.json dict (unknown keys ignored, bad values a ConfigError)."""
    fam = family(config.get("model_type", "<missing>"))
    try:
        return fam.ModelArgs.from_dict(config)
    except TypeError as e:
        raise ConfigError(f"config.json does not fit {fam.__name__}: {e}") from None


def build_model(config: dict) -> CausalLM:
    """The whole model on the meta device: names and shapes, no memory; weights come from a WeightSource."""
    args = parse_args(config)
    with torch.device("meta"):
        return family(config["model_type"]).build(args)


__all__ = ["FAMILIES", "Batch", "CausalLM", "ConfigError", "build_model", "parse_args"]
