"""Open what a user points at: a Hugging Face model directory (config.json + safetensors + tokenizer files; with
a GGUF quant of the same model beside them, its routed experts: tandem.weights.hybrid) or a GGUF file (config,
weights and tokenizer all from the one file, or from the parts of a split one)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tandem.models.base import ConfigError
from tandem.tokenize.tokenizer import Tokenizer
from tandem.weights import SafetensorsSource
from tandem.weights.gguf import GGUFSource
from tandem.weights.hybrid import HybridSource, open_hybrid


@dataclass
class Checkpoint:
    path: Path
    config: dict  # config.json as Hugging Face spells it
    source: SafetensorsSource | GGUFSource | HybridSource  # name -> tensor
    tokenizer: Tokenizer | None

    @property
    def eos_ids(self) -> list[int]:
        if self.tokenizer is not None and self.tokenizer.eos_ids:
            return self.tokenizer.eos_ids
        v = self.config.get("eos_token_id")
        return v if isinstance(v, list) else [v] if isinstance(v, int) else []


def read_config(path: Path) -> dict:
    """config.json of model directory `path`; a ConfigError names the file and what is wrong."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{path}: no config.json here (expected a Hugging Face model directory)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    if "model_type" not in config:
        raise ConfigError(f"{cfg_path}: has no model_type, so its architecture is unknown")
    return config


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Config, weights (memory-mapped, nothing read yet) and tokenizer of a model."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from tandem.tokenize.gguf import tokenizer_from_gguf
        from tandem.weights.gguf import open_gguf_source

        config, source, first = open_gguf_source(path)
        return Checkpoint(path, config, source, tokenizer_from_gguf(first.metadata))
    config = read_config(path)
    source = open_hybrid(path, config) or SafetensorsSource.open(path)
    return Checkpoint(path, config, source, Tokenizer.from_dir(path))
