"""Optimize rules (KTransformers-compatible YAML): parse and validate -> RuleSet; plan -> Placement;
inject(model, RuleSet) places and loads a model; explain shows a placement from config.json alone."""

from tandem.rules.inject import inject
from tandem.rules.parse import Rule, RuleError, RuleSet, parse_rules, read_rules
from tandem.rules.plan import ModulePlacement, Placement, available_devices, plan
from tandem.rules.presets import list_presets, load_rules

__all__ = ["ModulePlacement", "Placement", "Rule", "RuleError", "RuleSet", "available_devices", "inject",
           "list_presets", "load_rules", "parse_rules", "plan", "read_rules"]
