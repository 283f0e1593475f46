"""Doorbells (csrc/tandem/doorbell.h) on the CPU alone: the pool's thread 0 polls them; a rung doorbell runs its
job once, clears `ring`, sets `done`; a doorbell re-armed (done = 0) rings again; rings are seen after the pool
has gone idle (thread 0 napping) and after the pool is recreated; removing doorbells while others ring is safe.
The GPU side (cuStreamWriteValue32 / WaitValue32 in a CUDA graph) is tests/gpu/test_doorbell.py."""

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
        assert time.perf_counter() - t0 < timeout_s, "the pool never set done"
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


def ring_and_check(bell: Doorbell, ref: torch.Tensor, out: torch.Tensor) -> None:
    out.zero_()
    bell.words[0] = 1
    wait_done(bell)
    assert torch.equal(out, ref)
    bell.words[16] = 0


def test_rings_reach_an_idle_pool_and_a_new_pool():
    job, ref, out = make_job(3, T=5)
    bell = Doorbell(job, pinned=False)
    time.sleep(0.1)  # past thread 0's 20 ms spin: it naps between polls
    ring_and_check(bell, ref, out)
    threads = K.num_threads()
    K.set_num_threads(1)  # a new pool: its thread 0 takes over the polling
    try:
        ring_and_check(bell, ref, out)
    finally:
        K.set_num_threads(threads)
    ring_and_check(bell, ref, out)


def test_removing_doorbells_while_others_ring():
    job, ref, out = make_job(4)
    keep = Doorbell(job, pinned=False)
    for i in range(50):
        extra = [Doorbell(make_job(10 + i % 3)[0], pinned=False) for _ in range(3)]
        ring_and_check(keep, ref, out)
        del extra  # removed (each waits out a poll pass in progress) while `keep` stays registered
    ring_and_check(keep, ref, out)
