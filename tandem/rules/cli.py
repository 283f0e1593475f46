"""`tandem rules explain MODEL --rules FILE|PRESET [--json] [--devices cpu,cuda:0]` and `tandem rules list`."""

from __future__ import annotations

import argparse
import json
import sys

from tandem.rules.parse import RuleError


def _devices(text: str) -> list[str]:
    from tandem.rules.parse import normalize_device

    out = []
    for d in text.split(","):
        n = normalize_device(d)
        if n is None:
            raise RuleError([f"--devices: {d!r} is not a device; write e.g. cpu,cuda:0,cuda:1"])
        out.append(n)
    return out if "cpu" in out else ["cpu", *out]


def explain_cmd(args) -> int:
    from tandem.rules.explain import explain, read_model_config, render
    from tandem.rules.presets import load_rules

    config = read_model_config(args.model)
    rules = load_rules(args.rules, config.get("model_type"))
    devices = _devices(args.devices) if args.devices else None
    p = explain(config, rules, devices, args.default_device, args.dtype, args.ctx)
    print(json.dumps(p.as_json(), indent=1) if args.json else render(p))
    for e in p.errors:
        print(f"tandem: error: {e}", file=sys.stderr)
    return 2 if p.errors else 0


def list_cmd(args) -> int:
    from tandem.rules.presets import list_presets

    for name, what in list_presets().items():
        print(f"{name:24} {what}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="optimize rules: explain a placement, list presets")
    rs = p.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    e = rs.add_parser("explain", help="where every module runs under a rule file (config.json only)")
    e.add_argument("model", help="model directory (or its config.json)")
    e.add_argument("--rules", required=True, help="a rule file (YAML) or a preset name (tandem rules list)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--devices", default=None, help="devices to plan for, e.g. cpu,cuda:0,cuda:1 "
                   "(default: this machine's)")
    e.add_argument("--default-device", default=None, help="device of modules no rule matches (default: cuda:0 if "
                   "planned for, else cpu)")
    e.add_argument("--dtype", default=None, help="weight dtype for the byte counts (default: the checkpoint's)")
    e.add_argument("--ctx", type=int, default=4096, help="KV-cache tokens for the byte counts (default 4096)")
    e.set_defaults(func=explain_cmd)
    ls = rs.add_parser("list", help="the presets shipped with tandem")
    ls.set_defaults(func=list_cmd)
