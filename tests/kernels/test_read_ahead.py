"""Read-ahead of the next layer's predicted experts (csrc/tandem/read_ahead.h), on the CPU alone: after a doorbell's
job the pool reads the predicted experts' gate and up rows until a doorbell rings; a ring stops it and the rung job
runs; the next call of that layer is scored against the prediction and computes the rows each thread read on that
thread; results are the same bits as without it."""

from __future__ import annotations

import time

import pytest
import torch

from tandem.gpu.doorbell import Doorbell
from tandem.kernels import cpu as K


def layer(E: int, I: int, H: int, seed: int) -> K.MoEExperts:  # noqa: E741
    """int8 experts from random blocks of one expert tiled E times (big layers without quantizing E experts)."""
    g = torch.Generator().manual_seed(seed)
    one = [K.quantize(torch.randn(r, c, generator=g) / c**0.5, "int8").reshape(-1) for r, c in ((I, H), (I, H),
                                                                                                 (H, I))]
    tiled = [b.reshape(1, -1).expand(E, -1).contiguous().reshape(-1) for b in one]
    return K.MoEExperts.from_blocks(*tiled, "int8", E, I, H, copy=True)


def call(experts: K.MoEExperts, ids: list[list[int]], seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(ids)
    x = torch.randn(ids.shape[0], experts._x.H, generator=g)
    tw = torch.rand(ids.shape, generator=g)
    out = torch.zeros_like(x)
    return experts.host_job(x, ids, tw, out), experts.forward(x, ids, tw), out


def ring(bell: Doorbell, timeout_s: float = 10.0) -> None:
    bell.words[0] = 1
    t0 = time.perf_counter()
    while int(bell.words[16]) != 1:
        assert time.perf_counter() - t0 < timeout_s, "the pool never set done"
    bell.words[16] = 0


def gate_up_bytes(experts: K.MoEExperts) -> int:
    """Bytes of one expert's gate and up rows (what a read-ahead reads of it)."""
    return (experts._x.nbytes(0) + experts._x.nbytes(1)) // experts._x.E


def wait_for(pred, timeout_s: float = 10.0) -> None:
    t0 = time.perf_counter()
    while not pred():
        assert time.perf_counter() - t0 < timeout_s
        time.sleep(1e-4)


def test_read_ahead_reads_the_predicted_experts_and_scores_the_next_call():
    a, b = layer(8, 64, 256, 1), layer(8, 64, 256, 2)
    job_a, ref_a, out_a = call(a, [[0, 3]], 3)
    job_b, ref_b, out_b = call(b, [[5, 1]], 4)
    bell_a, bell_b = Doorbell(job_a, pinned=False), Doorbell(job_b, pinned=False)
    hint = torch.tensor([[5, 7, 5]])  # 5 twice: read once; 7 is a miss
    K.doorbell_read_ahead(bell_a.words.data_ptr(), b, hint)
    s0 = K.read_ahead_stats()
    ring(bell_a)
    wait_for(lambda: K.read_ahead_stats()["bytes"] - s0["bytes"] >= 2 * gate_up_bytes(b))
    time.sleep(0.01)
    s1 = K.read_ahead_stats()
    assert s1["jobs"] - s0["jobs"] == 1 and s1["stopped"] == s0["stopped"]
    assert s1["bytes"] - s0["bytes"] == 2 * gate_up_bytes(b)  # experts 5 and 7, every gate and up row
    ring(bell_b)
    s2 = K.read_ahead_stats()
    assert (s2["predicted"] - s1["predicted"], s2["needed"] - s1["needed"], s2["hits"] - s1["hits"]) == (2, 2, 1)
    assert s2["used"] - s1["used"] == gate_up_bytes(b)  # expert 5's rows, each on the thread that read it
    assert s2["jobs"] == s1["jobs"]  # b's doorbell names no read-ahead
    assert torch.equal(out_a, ref_a) and torch.equal(out_b, ref_b)


@pytest.fixture(params=sorted({1, K.physical_cores() - 1} - {0}))
def threads_leaving_a_core(request):
    """Pool sizes that leave Python (which rings here, as a GPU does in a model) a core: 1 thread reads and polls;
    more: thread 0 polls while the others read."""
    before = K.num_threads()
    K.set_num_threads(request.param)
    yield request.param
    K.set_num_threads(before)


def test_a_ring_stops_the_read_ahead_and_the_rung_job_runs(threads_leaving_a_core):
    a, b = layer(8, 64, 256, 5), layer(64, 512, 2048, 6)  # b: 64 experts of 3.3 MB
    job_a, ref_a, out_a = call(a, [[1, 2]], 7)
    bell_a = Doorbell(job_a, pinned=False)
    hint = torch.arange(64).reshape(8, 8)  # every expert of b predicted: ~210 MB to read
    K.doorbell_read_ahead(bell_a.words.data_ptr(), b, hint)
    stopped = 0
    for i in range(4):
        job_b, ref_b, out_b = call(b, [[i, 40 + i], [9, 63]], 8 + i)
        bell_b = Doorbell(job_b, pinned=False)
        s0 = K.read_ahead_stats()
        ring(bell_a)
        ring(bell_b)  # at once: the read-ahead is still reading (unless Python lost its core for ~10 ms)
        s1 = K.read_ahead_stats()
        if s1["stopped"] - s0["stopped"] == 1:
            stopped += 1
            assert s1["bytes"] - s0["bytes"] < 64 * gate_up_bytes(b)
        assert (s1["needed"] - s0["needed"], s1["hits"] - s0["hits"]) == (4, 4)
        assert torch.equal(out_a, ref_a) and torch.equal(out_b, ref_b)
        del bell_b
    assert stopped >= 2


def test_removing_a_doorbell_stops_its_read_ahead():
    a, b = layer(8, 64, 256, 9), layer(64, 512, 2048, 10)
    job_a, _, _ = call(a, [[1, 2]], 11)
    bell_a = Doorbell(job_a, pinned=False)
    K.doorbell_read_ahead(bell_a.words.data_ptr(), b, torch.arange(64).reshape(8, 8))
    ring(bell_a)
    del bell_a  # returns once no read-ahead of it runs: b may be freed after
    del b
    job_c, ref_c, out_c = call(layer(8, 64, 256, 12), [[3, 4]], 13)
    bell_c = Doorbell(job_c, pinned=False)
    ring(bell_c)
    assert torch.equal(out_c, ref_c)


def test_read_ahead_of_an_unregistered_doorbell_or_bad_ids_is_refused():
    b = layer(8, 64, 256, 14)
    words = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(ValueError, match="not registered"):
        K.doorbell_read_ahead(words.data_ptr(), b, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        K.doorbell_read_ahead(words.data_ptr(), b, torch.zeros(1, 2, dtype=torch.int32))


@pytest.fixture(params=[1, 2])
def shards(request):
    """Experts in one shard, or split over two NUMA groups of the pool (forced on a one-node machine)."""
    K.set_numa_nodes(request.param)
    yield request.param
    K.set_numa_nodes(None)


def test_each_thread_computes_the_rows_it_read_ahead_in_every_shard(shards):
    a, b = layer(8, 64, 256, 15), layer(8, 96, 512, 16)
    assert len(b.shards) == shards
    job_a, ref_a, out_a = call(a, [[1, 2]], 17)
    job_b, ref_b, out_b = call(b, [[1, 2], [3, 6]], 18)  # two tokens: experts 1, 2, 3 predicted, 6 not
    bell_a, bell_b = Doorbell(job_a, pinned=False), Doorbell(job_b, pinned=False)
    hint = torch.tensor([[0, 1], [2, 3]])  # kept alive while the doorbell is
    K.doorbell_read_ahead(bell_a.words.data_ptr(), b, hint)
    s0 = K.read_ahead_stats()
    ring(bell_a)
    wait_for(lambda: K.read_ahead_stats()["bytes"] - s0["bytes"] >= 4 * gate_up_bytes(b))
    time.sleep(0.01)
    ring(bell_b)
    s1 = K.read_ahead_stats()
    assert s1["bytes"] - s0["bytes"] == 4 * gate_up_bytes(b) and s1["used"] - s0["used"] == 3 * gate_up_bytes(b)
    assert torch.equal(out_a, ref_a) and torch.equal(out_b, ref_b)
