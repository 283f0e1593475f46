"""Host functions on a CUDA stream: cudaLaunchHostFunc through ctypes on the CUDA runtime torch already loaded.

A host function runs on a driver thread when the stream reaches it and the stream waits for it to return, so
a CPU kernel can sit between GPU work in stream order, and inside a captured CUDA graph (a host node). The C
entry point and its argument come from tandem.kernels.cpu (MoEExperts.host_job: a forward bound to pinned
buffers); nothing here calls back into Python.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from functools import cache

import torch


def _loaded_cudart() -> str | None:
    """The libcudart this process has mapped (torch's), so the stream handles are that runtime's own."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if "libcudart" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def _candidates() -> list[str]:
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = [_loaded_cudart(), ctypes.util.find_library("cudart")]
    found += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "lib", "libcudart.so*")), reverse=True)
    found += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_runtime", "lib", "libcudart.so*")), reverse=True)
    found += sorted(glob.glob(os.path.join(torch_lib, "libcudart*.so*")), reverse=True)
    return [p for p in dict.fromkeys(found) if p]


@cache
def cudart() -> ctypes.CDLL:
    """The CUDA runtime library (dlopen), with cudaLaunchHostFunc's signature declared."""
    torch.cuda.init()  # torch maps its libcudart on first CUDA use
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            fn = lib.cudaLaunchHostFunc
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {e}")
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return lib
    raise OSError("cannot find libcudart with cudaLaunchHostFunc (tried: " + "; ".join(errors or ["nothing"]) + ")")


def launch_host_func(fn: int, arg: int, stream: torch.cuda.Stream | None = None) -> None:
    """Enqueue the C function at address `fn` with argument `arg` on `stream` (default: the current stream)."""
    stream = stream or torch.cuda.current_stream()
    err = cudart().cudaLaunchHostFunc(ctypes.c_void_p(stream.cuda_stream), ctypes.c_void_p(fn), ctypes.c_void_p(arg))
    if err != 0:
        raise RuntimeError(f"cudaLaunchHostFunc failed with CUDA error {err}")


SCHEDULE = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}  # CU_CTX_SCHED_*: how a host thread waits on the GPU


def set_schedule(mode: str) -> int:
    """How host threads wait for the GPU (cudaStreamSynchronize, event waits, graph syncs) on every device:
    "auto" (CUDA's default: spin while there are fewer contexts than cores), "spin", "yield" or "blocking"
    (sleep until the GPU interrupts). Sets the primary contexts' flags through the driver API, so call it before
    the first CUDA use (a context made earlier may keep its old flags). Returns the number of devices set."""
    if mode not in SCHEDULE:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULE)}, got {mode!r}")
    cuda = ctypes.CDLL("libcuda.so.1")
    if cuda.cuInit(0) != 0:
        raise OSError("cuInit failed: no usable CUDA driver")
    count = ctypes.c_int()
    cuda.cuDeviceGetCount(ctypes.byref(count))
    for i in range(count.value):
        dev = ctypes.c_int()
        err = cuda.cuDeviceGet(ctypes.byref(dev), i) or cuda.cuDevicePrimaryCtxSetFlags(dev, SCHEDULE[mode])
        if err != 0:
            raise RuntimeError(f"cuDevicePrimaryCtxSetFlags(device {i}, {mode}) failed with CUDA error {err}")
    return count.value


def schedule() -> str:
    """The current device's primary context scheduling mode (one of SCHEDULE's names; "auto" if unknown)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), torch.cuda.current_device() if torch.cuda.is_initialized()
                                          else 0) or cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags),
                                                                                      ctypes.byref(active)):
        return "auto"
    return {v: k for k, v in SCHEDULE.items()}.get(flags.value & 7, "auto")
