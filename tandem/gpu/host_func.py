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
