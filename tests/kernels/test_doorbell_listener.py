"""The doorbell listener (csrc/tandem/doorbell.h) on the CPU alone: a rung doorbell runs its job once, clears
`ring`, sets `done`; jobs of several doorbells run in the order they ring; a doorbell re-armed (done = 0) rings
again. The GPU side (cuStreamWriteValue32 / WaitValue32 in a CUDA graph) is tests/gpu/test_doorbell.py."""

from __future__ import annotations

import time

import torch

from tandem.gpu.doorbell import Doorbell
from tandem.kernels import cpu as K


def make_job(seed: int, T: int = 3):
    E, I, H, k = 8, 64, 128, 2  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    w = K.MoEExperts.from_weights(*(torch.randn(E, *s, generator=g) * 0.1 for s in ((I, H), (I, H), (H, I))),
                                  "int8")
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    tw = torch.rand(T, k, generator=g)
    out = torch.zeros(T, H)
    return w.host_job(x, ids, tw, out), w.forward(x, ids, tw), out


def wait_done(bell: Doorbell, timeout_s: float = 10.0) -> None:
    t0 = time.perf_counter()
    while int(bell.words[16]) != 1:
        assert time.perf_counter() - t0 < timeout_s, "the listener never set done"
        time.sleep(1e-4)


def test_rung_doorbells_run_their_jobs_and_rearm():
    jobs = [make_job(s) for s in (1, 2)]
    bells = [Doorbell(job, pinned=False) for job, _, _ in jobs]
    before = K.doorbell_jobs_run()
    for _ in range(2):
        for bell, (_, ref, out) in zip(bells, jobs):
            out.zero_()
            bell.words[0] = 1  # ring, as the stream's cuStreamWriteValue32 does
            wait_done(bell)
            assert int(bell.words[0]) == 0  # taken
            assert torch.equal(out, ref)
            bell.words[16] = 0  # re-armed, as the stream does after its wait
    assert K.doorbell_jobs_run() - before == 4
    time.sleep(0.01)
    assert K.doorbell_jobs_run() - before == 4  # nothing runs unrung
