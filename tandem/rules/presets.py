"""Rule presets shipped in the package: presets/<family>/<name>.yaml, named "<family>/<name>"."""

from __future__ import annotations

from pathlib import Path

from tandem.rules.parse import RuleError, RuleSet, parse_rules, read_rules

PRESETS = Path(__file__).parent / "presets"
# config.json model_type -> preset family
FAMILY_PRESETS = {"llama": "llama", "mistral": "llama", "mixtral": "mixtral", "qwen2_moe": "qwen2-moe",
                  "qwen3_moe": "qwen3-moe", "deepseek_v2": "deepseek-v2", "deepseek_v3": "deepseek-v3",
                  "kimi_k2": "deepseek-v3"}


def list_presets() -> dict[str, str]:
    """preset name -> its first comment line (what it does)."""
    out = {}
    for f in sorted(PRESETS.glob("*/*.yaml")):
        first = f.read_text().splitlines()[0] if f.stat().st_size else ""
        out[f"{f.parent.name}/{f.stem}"] = first.lstrip("# ").strip()
    return out


def load_rules(spec: str, model_type: str | None = None) -> RuleSet:
    """Rules from a file path or a preset name ("deepseek-v3/1gpu"; a bare "1gpu" picks the preset of
    `model_type`'s family); "auto" is the planner's ([F])."""
    if spec == "auto":
        raise NotImplementedError("rules=\"auto\" (planning placement from the devices' memory) arrives with "
                                  "issue [F]; give a preset (tandem rules list) or a rule file")
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return read_rules(path)
    if "/" not in spec and model_type in FAMILY_PRESETS:
        spec = f"{FAMILY_PRESETS[model_type]}/{spec}"
    preset = PRESETS / f"{spec}.yaml"
    if "/" in spec and preset.is_file():
        return parse_rules(preset.read_text(), f"preset {spec}")
    known = ", ".join(list_presets())
    raise RuleError([f"rules {spec!r}: no such file, and not a preset (presets: {known})"])
