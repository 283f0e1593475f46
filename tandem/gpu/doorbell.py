"""Doorbells: a CUDA stream hands a layer's CPU experts their work through pinned memory, not a host node.

Per layer a host node costs two driver hand-offs (~15-20 us each on an H200 host): the driver's callback thread
wakes when the stream reaches the node, and the stream resumes only once the driver sees it return. A doorbell
(csrc/tandem/doorbell.h) is two words of pinned memory; the stream

    writes ring = 1      cuStreamWriteValue32, preceded by a system-wide fence: the staged x / ids / weights
                         are visible to the CPU before the ring
    waits for done == 1  cuStreamWaitValue32, in the stream's front end (no SM spins)
    writes done = 0      ready for the next step

while the pool's thread 0, which spins between decode calls anyway, polls every registered doorbell, clears a
rung one and posts its job to the pool; the job's last thread out sets done (csrc/tandem/doorbell.h). No thread
sleeps or wakes on the way, and no core is needed for a driver thread. Stream memory operations are captured into
CUDA graphs as memory-operation nodes. `available()` says whether this driver has them; TANDEM_DOORBELLS=0 falls
back to host nodes.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

import torch

# on by default (TANDEM_DOORBELLS=0: host nodes): on the H200 host, Qwen3's gap between CPU calls 85 -> 50 us per
# layer at the same call time, decode b1 232 -> 309 tok/s (8 layers; bench/results/e2e-h200.md)
ENABLED = os.environ.get("TANDEM_DOORBELLS", "1") == "1"
WRITE_DEFAULT = 0  # CU_STREAM_WRITE_VALUE_DEFAULT: a memory barrier before the write
WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ


@cache
def _libcuda() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    for name in ("cuStreamWriteValue32_v2", "cuStreamWaitValue32_v2"):
        fn = getattr(lib, name, None)
        if fn is None:
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether this driver has the v2 stream memory operations (always enabled since CUDA 12; the v1 ones needed
    a kernel module option)."""
    return _libcuda() is not None and torch.cuda.is_available()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {status}")


class Doorbell:
    """One job's doorbell: words (ring at 0, done at 64 bytes; pinned when a GPU rings it) registered with the
    kernel's pool, which runs `job` (a tandem.kernels.cpu.HostJob) each time the doorbell rings."""

    def __init__(self, job, pinned: bool = True) -> None:
        from tandem.kernels import cpu

        words = torch.zeros(32, dtype=torch.int32)
        self.words = words.pin_memory() if pinned else words
        self.job = job  # kept alive with the doorbell: the pool holds their addresses
        self._remove = cpu.doorbell_remove
        cpu.doorbell_add(self.words.data_ptr(), job.arg)

    def __del__(self) -> None:
        self._remove(self.words.data_ptr())  # before the words and the job are freed

    def ring_and_wait(self, stream: torch.cuda.Stream) -> None:
        """On `stream`: ring, wait until the CPU has done the job, re-arm (capturable into a CUDA graph)."""
        lib, s = _libcuda(), ctypes.c_void_p(stream.cuda_stream)
        ring, done = self.words.data_ptr(), self.words.data_ptr() + 64
        _check(lib.cuStreamWriteValue32_v2(s, ring, 1, WRITE_DEFAULT), "cuStreamWriteValue32 (ring)")
        _check(lib.cuStreamWaitValue32_v2(s, done, 1, WAIT_EQ), "cuStreamWaitValue32 (done)")
        _check(lib.cuStreamWriteValue32_v2(s, done, 0, WRITE_DEFAULT), "cuStreamWriteValue32 (re-arm)")
