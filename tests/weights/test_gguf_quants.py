"""Dequantizers against the gguf package's reference (gguf.quants) and against hand-made blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.weights.gguf_quants import NAMES, TYPES, dequantize

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

# byte offsets of the float16 scale fields, which random bytes would make inf / nan
F16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


@pytest.mark.parametrize("name", sorted(F16_AT))
def test_random_blocks_match_gguf_reference(name):
    """Random bytes set every bit of every field; the result must equal gguf's numpy dequantizer exactly."""
    qt = TYPES[NAMES[name]]
    rng = np.random.default_rng(qt.id)
    raw = rng.integers(0, 256, size=(300, qt.bytes), dtype=np.uint8)
    for at in F16_AT[name]:
        raw[:, at : at + 2] = np.frombuffer(rng.uniform(-2, 2, 300).astype(np.float16).tobytes(), np.uint8).reshape(
            -1, 2)
    ref = ref_dequantize(raw.reshape(-1), gguf.GGMLQuantizationType(qt.id)).reshape(-1)
    got = dequantize(torch.from_numpy(raw.reshape(-1)), qt.id, (300 * qt.block,))
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"])
def test_reference_quantized_weights_round_trip(name):
    x = np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[name]
    raw = ref_quantize(x, qtype)
    ref = ref_dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw.reshape(-1).view(np.uint8)), NAMES[name], (16, 128))
    np.testing.assert_array_equal(got.numpy(), ref)
    assert np.abs(got.numpy() - x).max() <= np.abs(x).max() / 7  # and it is x, to 4-bit precision or better


def _block(*parts) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def test_known_values():
    half, two = np.float16(0.5).tobytes(), np.float16(2.0).tobytes()
    # Q8_0: x = d q
    q = np.arange(-16, 16, dtype=np.int8)
    got = dequantize(_block(half, q.tobytes()), NAMES["Q8_0"], (32,))
    assert got.tolist() == (q * 0.5).tolist()
    # Q4_0: low nibbles are values 0..15, high nibbles 16..31; x = (q - 8) d
    qs = bytes((i % 16) | ((15 - i % 16) << 4) for i in range(16))
    got = dequantize(_block(two, qs), NAMES["Q4_0"], (32,))
    assert got.tolist() == [(i - 8) * 2.0 for i in range(16)] + [(7 - i) * 2.0 for i in range(16)]
    # Q4_1: x = q d + m
    got = dequantize(_block(half, two, bytes([0x31] * 16)), NAMES["Q4_1"], (32,))
    assert got.tolist() == [2.5] * 16 + [3.5] * 16
    # Q6_K with every quant 32 (zero) except the first, all scales 1: only x[0] = d (33 - 32)
    ql, qh = bytearray(128), bytearray(64)
    ql[0] = 0x1
    for i in range(64):
        qh[i] = 0b10101010  # high bits 2 everywhere: q = low | 32
    got = dequantize(_block(bytes(ql), bytes(qh), bytes([1] * 16), two), NAMES["Q6_K"], (256,))
    assert got[0].item() == 2.0 and got[1:].abs().max().item() == 0.0


def test_dequantize_in_chunks_and_dtype(monkeypatch):
    import tandem.weights.gguf_quants as gq

    raw = np.random.default_rng(2).integers(0, 256, size=(40, 34), dtype=np.uint8)
    raw[:, :2] = np.frombuffer(np.full(40, 0.25, np.float16).tobytes(), np.uint8).reshape(-1, 2)
    whole = dequantize(torch.from_numpy(raw.reshape(-1)), NAMES["Q8_0"], (10, 128))
    monkeypatch.setattr(gq, "ROWS_PER_CHUNK", 96)  # 3 blocks at a time, not a divisor of 40
    chunked = gq.dequantize(torch.from_numpy(raw.reshape(-1)), NAMES["Q8_0"], (10, 128), torch.bfloat16)
    assert chunked.dtype == torch.bfloat16
    torch.testing.assert_close(chunked.float(), whole.bfloat16().float(), rtol=0, atol=0)
