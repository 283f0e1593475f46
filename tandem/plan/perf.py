"""A simple performance model to rank plans that fit: decode is memory-bound (every byte a step reads, over the
bandwidth of the memory it lives in), prefill compute-bound (FLOPs over each device's rate, plus weights
streamed over PCIe when CPU experts prefill on a GPU). Rates are measured (`tandem plan --measure`, cached in
~/.cache/tandem/rates.json) or given; the defaults are assumptions, and the plan says which it used.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

RATE_FIELDS = ("ram_bw", "pcie_bw", "gpu_bw", "cpu_flops", "gpu_flops")


@dataclass(frozen=True, slots=True)
class Rates:
    """Bytes/s and FLOP/s of the machine the plan is for."""

    ram_bw: float = 100e9  # host memory read bandwidth (a 2-socket DDR5 server reads ~300e9, a desktop ~60e9)
    pcie_bw: float = 25e9  # host <-> GPU copies (PCIe 4.0 x16)
    gpu_bw: float = 1.0e12  # GPU memory read bandwidth (RTX 4090 ~1e12, H200 ~4.8e12)
    cpu_flops: float = 2e12  # bf16 FLOP/s the CPU sustains on expert GEMMs
    gpu_flops: float = 150e12  # bf16 FLOP/s one GPU sustains
    hop_s: float = 20e-6  # one hidden-state move between devices (launch + sync)
    source: str = "assumed"  # "assumed", "measured", "given", or a mix

    def with_given(self, **given: float | None) -> Rates:
        given = {k: v for k, v in given.items() if v is not None}
        return replace(self, **given, source=f"{self.source}; given {', '.join(given)}") if given else self


def _cache() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem")) / "rates.json"


def cached_rates() -> Rates:
    """Rates measured earlier on this machine, else the assumed defaults."""
    try:
        d = json.loads(_cache().read_text())
        return Rates(**{k: float(d[k]) for k in RATE_FIELDS}, source="measured")
    except (OSError, ValueError, KeyError, TypeError):
        return Rates()


def measure_rates() -> Rates:
    """Measure host read bandwidth (the CPU kernels' probe) and, with a GPU, its copy bandwidth, PCIe and
    matmul rate; cache them."""
    import torch

    base = Rates()
    found = {}
    try:
        from tandem.kernels.cpu import _tandem_cpu as C

        buf = torch.ones((1 << 30) // 8, dtype=torch.int64)
        ptr, n = buf.data_ptr(), buf.numel() * 8
        C.read_buffer(ptr, n)
        found["ram_bw"] = n / min(_timed(lambda: C.read_buffer(ptr, n)) for _ in range(3))
        del buf
    except (ImportError, AttributeError):
        pass
    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    t = min(_timed(lambda: a @ a) for _ in range(3))
    found["cpu_flops"] = 2 * 1024**3 / t
    if torch.cuda.is_available():
        x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
        host = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
        found["pcie_bw"] = (1 << 28) / min(_timed(lambda: x.copy_(host), cuda=True) for _ in range(3))
        y = torch.empty_like(x)
        found["gpu_bw"] = 2 * (1 << 28) / min(_timed(lambda: y.copy_(x), cuda=True) for _ in range(3))
        m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        found["gpu_flops"] = 2 * 8192**3 / min(_timed(lambda: m @ m, cuda=True) for _ in range(3))
    rates = replace(base, **found, source="measured")
    _cache().parent.mkdir(parents=True, exist_ok=True)
    _cache().write_text(json.dumps(asdict(rates), indent=1))
    return rates


def _timed(fn, cuda: bool = False) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@dataclass(frozen=True, slots=True)
class Estimate:
    decode_tok_s: float  # all sequences together
    prefill_tok_s: float  # one sequence's prompt

    def key(self) -> tuple[float, float]:
        """Sort key: faster decode first, then faster prefill."""
        return (-self.decode_tok_s, -self.prefill_tok_s)


def touched(fraction_per_token: float, tokens: int) -> float:
    """Expected fraction of experts a step of `tokens` tokens reads, each token picking `fraction` of them."""
    f = min(max(fraction_per_token, 0.0), 1.0)
    return 1.0 - (1.0 - f) ** tokens
