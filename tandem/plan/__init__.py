"""Automatic placement: fit a model to the GPUs, RAM and context it is given (`tandem plan`, rules="auto").

devices.py what there is; source.py what the model holds (headers or preset shapes); trace.py + memory.py what
each part costs on a device; perf.py what it is worth; placement.py the decisions; planner.py the whole
request; render.py rules/table/JSON; auto.py tandem.load's rules="auto"; profile.py routing statistics.
"""

from tandem.plan.devices import Device, detect_devices, given_devices, parse_size
from tandem.plan.planner import Plan, PlanError, load_stats, make_plan
from tandem.plan.source import open_source

__all__ = ["Device", "Plan", "PlanError", "detect_devices", "given_devices", "load_stats", "make_plan",
           "open_source", "parse_size"]
