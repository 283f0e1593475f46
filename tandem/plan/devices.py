"""The devices a plan fills: GPUs and host RAM, detected or given (`--gpu 24GiB --gpu 6GiB --ram 128GiB`).

A device's capacity is its memory less a reserve the plan never touches (other programs, the display, a draft
model). Sizes are written like `24GiB`, `24GB` (10^9), `512MiB`, `1.5TiB` or plain bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
         "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
GPU_RESERVE = 512 << 20  # default per-GPU reserve: fragmentation slack and whatever else shares the card
RAM_RESERVE = 4 * GiB  # default host reserve: the OS, page tables, other programs


@dataclass(frozen=True, slots=True)
class Device:
    """One memory pool the plan fills: a GPU (`cuda:N`) or host RAM (`cpu`)."""

    name: str  # "cuda:0" or "cpu"
    memory: int  # bytes it has
    reserve: int  # bytes the plan leaves free
    label: str = ""  # what it is ("NVIDIA H200", "given")

    @property
    def is_gpu(self) -> bool:
        return self.name.startswith("cuda")

    @property
    def capacity(self) -> int:
        """Bytes the plan may fill."""
        return max(self.memory - self.reserve, 0)


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes in `text` ("24GiB", "6GB", "512MiB", "1073741824"); ValueError naming `what` otherwise."""
    if isinstance(text, int):
        return text
    m = SIZE.match(str(text))
    if not m or m[2].lower() not in UNITS:
        raise ValueError(f"{what} {text!r} is not a size; write e.g. 24GiB, 6GB, 512MiB")
    return int(float(m[1]) * UNITS[m[2].lower()])


def format_size(n: int | float) -> str:
    """Bytes as GiB with two decimals (MiB below one GiB)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / (1 << 20):.0f} MiB"


def given_devices(gpus: list[str], ram: str | None, reserve: str | None = None,
                  ram_reserve: str | None = None) -> list[Device]:
    """Devices from the command line: `--gpu SIZE` per GPU (cuda:0, cuda:1, ... in order) and `--ram SIZE`.

    With no --ram, host RAM is this machine's.
    """
    res = GPU_RESERVE if reserve is None else parse_size(reserve, "--reserve")
    out = [Device(f"cuda:{i}", parse_size(g, "--gpu"), res, "given") for i, g in enumerate(gpus)]
    for d in out:
        if d.memory <= res:
            raise ValueError(f"--gpu {gpus[int(d.name[5:])]}: {d.name} has no room left after its "
                             f"{format_size(res)} reserve (--reserve)")
    out.append(host_ram(ram, ram_reserve))
    return out


def host_ram(ram: str | None = None, ram_reserve: str | None = None) -> Device:
    """Host RAM: given, or this machine's (MemTotal of /proc/meminfo)."""
    res = RAM_RESERVE if ram_reserve is None else parse_size(ram_reserve, "--ram-reserve")
    if ram is not None:
        size = parse_size(ram, "--ram")
        if size <= res:
            raise ValueError(f"--ram {ram}: no room left after the {format_size(res)} host reserve (--ram-reserve)")
        return Device("cpu", size, res, "given")
    return Device("cpu", _meminfo("MemTotal"), res, "this machine")


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_devices(reserve: str | None = None, ram: str | None = None, ram_reserve: str | None = None) -> list[Device]:
    """This machine's GPUs (as torch sees them) and host RAM."""
    import torch

    res = GPU_RESERVE if reserve is None else parse_size(reserve, "--reserve")
    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(Device(f"cuda:{i}", p.total_memory, res, p.name))
    out.append(host_ram(ram, ram_reserve))
    return out
