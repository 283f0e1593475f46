"""`tandem plan MODEL [--gpu 24GiB ...] [--ram 128GiB] [--context N] [--json] [--out rules.yaml]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def plan_cmd(args) -> int:
    from tandem.plan.devices import detect_devices, given_devices
    from tandem.plan.perf import cached_rates, measure_rates
    from tandem.plan.planner import load_stats, make_plan
    from tandem.plan.render import dumps, table
    from tandem.plan.source import open_source

    src = open_source(args.model, args.layers)
    devices = (given_devices(args.gpu, args.ram, args.reserve, args.ram_reserve) if args.gpu else
               detect_devices(args.reserve, args.ram, args.ram_reserve))
    rates = (measure_rates() if args.measure else cached_rates()).with_given(
        ram_bw=_gbs(args.ram_bw), pcie_bw=_gbs(args.pcie_bw), gpu_bw=_gbs(args.gpu_bw),
        cpu_flops=_tflops(args.cpu_tflops), gpu_flops=_tflops(args.gpu_tflops))
    stats = load_stats(args.expert_stats, len(src.model.model.layers)) if args.expert_stats else None
    plan = make_plan(src, devices, args.context, args.sequences, args.prefill_chunk, args.dtype, args.kv_dtype,
                     args.rules, stats, rates)
    if args.out:
        Path(args.out).write_text(plan.rules)
    print(dumps(plan) if args.json else table(plan))
    if args.out and not args.json:
        print(f"rules written to {args.out}: tandem run {args.model} --rules {args.out} ...", file=sys.stderr)
    return 0


def _gbs(v: float | None) -> float | None:
    return None if v is None else v * 1e9


def _tflops(v: float | None) -> float | None:
    return None if v is None else v * 1e12


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="fit a model to the GPUs, RAM and context given: rules, a table, JSON")
    p.add_argument("model", help="model directory, .gguf file, or synth preset (deepseek-v3, qwen3-30b-a3b, ...)")
    p.add_argument("--layers", type=int, default=None, help="a synth preset with this many layers")
    p.add_argument("--gpu", action="append", default=[], metavar="SIZE",
                   help="a GPU's memory, e.g. 24GiB (repeat per GPU: cuda:0, cuda:1, ...); default: this machine's")
    p.add_argument("--ram", default=None, metavar="SIZE", help="host RAM (default: this machine's)")
    p.add_argument("--reserve", default=None, metavar="SIZE", help="memory left free on each GPU (default 512MiB)")
    p.add_argument("--ram-reserve", default=None, metavar="SIZE", help="host RAM left free (default 4GiB)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the largest that fits)")
    p.add_argument("--sequences", type=int, default=1, help="sequences running at once (default 1)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per sequence per step (default 2048, less if that keeps layers on the GPUs)")
    p.add_argument("--dtype", default=None, help="weights in memory: bfloat16 | float16 | float32 (default: "
                   "the checkpoint's)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: the weights')")
    p.add_argument("--rules", default=None, help="your rules (file or preset): kept as they are, planned around")
    p.add_argument("--expert-stats", default=None, metavar="FILE",
                   help="routing counts (tandem profile-experts): the hottest experts go to the GPUs")
    p.add_argument("--json", action="store_true", help="print JSON: devices, excluded, context, rules")
    p.add_argument("--out", default=None, help="write the rule file here")
    p.add_argument("--measure", action="store_true", help="measure this machine's bandwidths and rates (cached)")
    p.add_argument("--ram-bw", type=float, default=None, metavar="GB/s", help="host memory bandwidth")
    p.add_argument("--pcie-bw", type=float, default=None, metavar="GB/s", help="host <-> GPU bandwidth")
    p.add_argument("--gpu-bw", type=float, default=None, metavar="GB/s", help="GPU memory bandwidth")
    p.add_argument("--cpu-tflops", type=float, default=None, help="CPU bf16 TFLOP/s on expert GEMMs")
    p.add_argument("--gpu-tflops", type=float, default=None, help="GPU bf16 TFLOP/s")
    p.set_defaults(func=plan_cmd)
