"""A plan as a rule file `tandem.load` accepts, as a table per device, and as JSON."""

from __future__ import annotations

import json

import yaml

from tandem.plan.devices import format_size

EXPERTS = r"^model\.layers\.\d+\.(mlp|block_sparse_moe)\.experts$"


def _runs(values: list) -> list[tuple[int, int, object]]:
    """Consecutive equal values as (start, end, value), skipping None."""
    out: list[tuple[int, int, object]] = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if out and out[-1][1] == i and out[-1][2] == v:
            out[-1] = (out[-1][0], i + 1, v)
        else:
            out.append((i, i + 1, v))
    return out


def _place(dev: str) -> dict:
    return {"generate_device": dev, "prefill_device": dev}


def planned_rules(a, model_rule: bool = True) -> list[dict]:
    """The plan's own rules (Python objects, dumped as YAML): model route, experts, layer ranges, globals."""
    rules: list[dict] = []
    if model_rule:
        route, prev = {}, None
        for i, d in enumerate(a.layers):
            if d != prev:
                route[i] = d
            prev = d
        rules.append({"match": {"name": "^model$"},
                      "replace": {"class": "tandem.ops.Model", "kwargs": {"transfer_map": route}}})
    for i, ids in sorted(a.hot.items()):
        rules.append({"match": {"name": EXPERTS, "layers": f"{i}:{i + 1}"},
                      "replace": {"class": "tandem.ops.Experts",
                                  "kwargs": {**_place("cpu"), "out_device": a.layers[i], "hot_experts": ids}},
                      "recursive": False})
    triples = [None if e is None else (e, p, a.layers[i]) for i, (e, p) in enumerate(zip(a.experts, a.experts_prefill))]
    for lo, hi, (gen, pre, out) in _runs(triples):
        kw = {"generate_device": gen, "prefill_device": pre, "out_device": out}
        if pre != gen:
            kw["prefill_op"] = "experts.torch"  # streams each expert's weights to the prefill device
        rules.append({"match": {"name": EXPERTS, "layers": f"{lo}:{hi}"},
                      "replace": {"class": "tandem.ops.Experts", "kwargs": kw}, "recursive": False})
    for name in ("model.embed_tokens", "model.norm", "lm_head"):
        if name in a.globals:
            rules.append({"match": {"name": "^" + name.replace(".", "\\.") + "$"},
                          "replace": {"class": "default", "kwargs": _place(a.globals[name])}})
    for lo, hi, dev in _runs(a.layers):
        rules.append({"match": {"name": r"^model\.layers\.", "layers": f"{lo}:{hi}"},
                      "replace": {"class": "default", "kwargs": _place(dev)}})
    return rules


def rules_yaml(a, header: str, user_text: str | None = None, model_rule: bool = True) -> str:
    """The rule file: the user's rules first, verbatim (the first matching rule wins, so they win), then ours."""
    ours = yaml.safe_dump(planned_rules(a, model_rule), sort_keys=False, default_flow_style=None, width=120)
    head = "".join(f"# {line}\n" for line in header.splitlines())
    if not user_text:
        return head + ours
    user = user_text if user_text.endswith("\n") else user_text + "\n"
    text = head + user + "# planned by tandem plan around the rules above\n" + ours
    if yaml.safe_load(text) != (yaml.safe_load(user_text) or []) + planned_rules(a, model_rule):
        # the user's file is not a block list we can append to: write both out as data
        text = head + yaml.safe_dump((yaml.safe_load(user_text) or []) + planned_rules(a, model_rule),
                                     sort_keys=False, default_flow_style=None, width=120)
    return text


def as_json(plan) -> dict:
    """{"devices": {name: {weights, kv, buffers, overhead, total, capacity}}, "excluded": [...], "context": n,
    "rules": "<yaml>"}."""
    keys = ("weights", "kv", "buffers", "overhead", "total", "capacity")
    return {"devices": {d: {k: int(v[k]) for k in keys} for d, v in plan.ledger.items()},
            "excluded": [d for d, _ in plan.excluded], "context": plan.workload.context, "rules": plan.rules}


def dumps(plan) -> str:
    return json.dumps(as_json(plan), indent=1)


def _span(ids: list[int]) -> str:
    runs = [(lo, hi - 1) for lo, hi, _ in _runs([True if i in set(ids) else None for i in range(max(ids) + 1)])]
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def table(plan) -> str:
    """The human view: what goes where, then one row per device (weights, KV, buffers, overhead, free)."""
    a, w = plan.assignment, plan.workload
    lines = [f"plan for {plan.source.name} ({plan.source.kind}): context {w.context} x {w.sequences} "
             f"sequence{'s' if w.sequences > 1 else ''}, prefill chunk {w.prefill_chunk}, weights "
             f"{str(w.dtype).removeprefix('torch.')}, KV {str(w.kv_dtype).removeprefix('torch.')}", ""]
    devs = sorted(set(a.layers), key=lambda d: (d == "cpu", d))
    for d in devs:
        ids = [i for i, x in enumerate(a.layers) if x == d]
        lines.append(f"  layers {_span(ids):<12} attention, norms, router, shared/dense MLP, KV cache on {d}")
    experts = {}
    for i, e in enumerate(a.experts):
        if e is not None:
            key = (e, a.experts_prefill[i])
            experts.setdefault(key, []).append(i)
    for (gen, pre), ids in experts.items():
        how = f"prefill streamed to {pre}" if pre != gen else ""
        lines.append(f"  layers {_span(ids):<12} routed experts on {gen}{'  (' + how + ')' if how else ''}")
    for i, ids in sorted(a.hot.items()):
        lines.append(f"  layer  {i:<12} {len(ids)} hot experts on {a.layers[i]} ({_span(ids)}), the rest on the CPU")
    for name, d in a.globals.items():
        lines.append(f"  {name:<19} on {d}")
    lines += ["", f"  {'device':8} {'weights':>11} {'kv cache':>11} {'buffers':>11} {'overhead':>11} "
              f"{'total':>11} {'capacity':>11} {'free':>11}"]
    for d, v in plan.ledger.items():
        cells = [format_size(v[k]) for k in ("weights", "kv", "buffers", "overhead", "total", "capacity")]
        free = format_size(v["capacity"] - v["total"])
        lines.append(f"  {d:8} " + " ".join(f"{c:>11}" for c in cells) + f" {free:>11}")
    for _, why in plan.excluded:
        lines.append(f"excluded: {why}")
    e = plan.estimate
    s = "s" if w.sequences > 1 else ""
    lines += ["", f"estimate: decode {e.decode_tok_s:.1f} tok/s ({w.sequences} sequence{s}),"
              f" prefill {e.prefill_tok_s:.0f} tok/s (rates {plan.rates.source})"]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
