"""Apply a RuleSet to a model built on meta: validate, then replace each placed module by its operator, which
loads its own weights on its own device. Nothing is read before every rule has been checked."""

from __future__ import annotations

import logging

import torch
from torch import nn

from tandem.ops.base import LoadContext, RunState
from tandem.ops.registry import BACKENDS, OPS, resolve
from tandem.rules.parse import RuleError, RuleSet
from tandem.rules.plan import Placement, plan

log = logging.getLogger("tandem.rules")


def check_loadable(placement: Placement, rules: RuleSet) -> list[str]:
    """Errors for kernels that are declared but not implemented yet (they explain, they do not load)."""
    errors, said = [], set()
    for p in placement.values():
        for key, b in (("generate_op", p.generate_op), ("prefill_op", p.prefill_op)):
            if b is None or not BACKENDS[b].pending or (p.rule, b) in said:
                continue
            said.add((p.rule, b))
            where = rules.rules[p.rule].where(f"replace.kwargs.{key}") if p.rule is not None else p.module
            usable = [x for x in OPS[p.op].backends if not BACKENDS[x].pending and BACKENDS[x].runs_on(
                p.generate_device if key == "generate_op" else p.prefill_device)]
            errors.append(f"{where}: kernel {b} is not available yet ({BACKENDS[b].pending}); "
                          f"use {' or '.join(usable) or 'another device'} for now")
    return errors


def inject(model: nn.Module, rules: RuleSet, source, family: str, dtype: torch.dtype = torch.bfloat16,
           devices: list[str] | None = None, default_device: str | None = None,
           tied: dict[str, str] | None = None, aliases: tuple[tuple[str, str], ...] = ()) -> Placement:
    """Place and load `model` (on meta) by `rules`; raises RuleError before reading any weight if they are wrong."""
    placement = plan(model, rules, family, devices, default_device, dtype)
    errors = placement.errors + check_loadable(placement, rules)
    if errors:
        raise RuleError(errors)
    for w in placement.warnings:
        log.warning("%s", w)
    ctx = LoadContext(source, dtype, dict(tied or {}), RunState(), placed=set(placement), aliases=tuple(aliases))
    # deepest first: an operator that wraps its module finds its children already replaced and loaded
    for name in sorted(placement, key=lambda n: n.count("."), reverse=True):
        p = placement[name]
        cfg = p.config()
        if p.op == "model":
            cfg.kwargs["transfer_map"] = {0: placement.start_device, **placement.transfer_map}
        module = model.get_submodule(name)
        new = resolve(OPS[p.op].build)(module, cfg, ctx)
        if new is not module:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    ctx.close()
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unloaded after injection: {', '.join(left[:5])}")
    return placement
