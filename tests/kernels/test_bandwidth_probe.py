"""The memory read probe (csrc/tandem/moe.cpp ReadJob): every byte is read once whatever the runs per thread, so
the checksum is the sum of the buffer's 64-bit words (the probe's GB/s are measured in bench/, not here)."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import cpu as K


@pytest.mark.parametrize("chunk", [64, 4096])
@pytest.mark.parametrize("streams", [1, 2, 4, 8])
@pytest.mark.parametrize("words", [8, 8 * 1000 + 8, 8 * 4099])  # whole 64-byte lines, some not split evenly
def test_read_buffer_reads_every_word_once(streams, words, chunk):
    g = torch.Generator().manual_seed(streams * 7 + words)
    buf = torch.randint(0, 1 << 40, (words,), dtype=torch.int64, generator=g)
    assert K._C.read_buffer(buf.data_ptr(), words * 8, streams, 4096, chunk) == int(buf.sum()) % (1 << 64)


def test_bandwidth_probe_reports_a_rate():
    assert K._C.bandwidth_probe(1 << 24, 1) > 0
