"""A numpy quantizer for ggml's K-quant blocks Q4_K, Q5_K and Q6_K, written from the block layouts of ggml-common.h
(the gguf package dequantizes them but has no quantizer). Plain min/max rounding, not llama.cpp's search: a valid
file with realistic error, for tests. Each function takes float32 rows [n, 256 k] and returns uint8 [n, bytes]."""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the float16 bytes [nb, 2], the float16 values as float32)."""
    h = v.astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def _scale_min(x: np.ndarray, qmax: int):
    """Sub-blocks of 32: value ~ d * sc * q - dmin * m, sc and m 6-bit. -> (d, dmin bytes, sc, m, q)."""
    lo = np.minimum(x.min(axis=2), 0)  # [nb, 8]; ggml keeps the offset a subtraction (min <= 0)
    scale = (x.max(axis=2) - lo) / qmax
    d_bytes, d = _f16(scale.max(axis=1) / 63)
    m_bytes, dmin = _f16(-lo.min(axis=1) / 63)
    sc = np.clip(np.rint(_div(scale, d[:, None])), 0, 63).astype(np.int32)
    m = np.clip(np.rint(_div(-lo, dmin[:, None])), 0, 63).astype(np.int32)
    step, off = d[:, None] * sc, dmin[:, None] * m
    q = np.clip(np.rint(_div(x + off[:, :, None], step[:, :, None])), 0, qmax).astype(np.int32)
    return d_bytes, m_bytes, sc, m, q


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """ggml's get_scale_min_k4 layout: 8 six-bit scales and mins in 12 bytes."""
    s = np.empty((sc.shape[0], 12), np.int32)
    s[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return s.astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """q [nb, 8, 32] (4-bit) -> 128 bytes: chunk c holds sub-block 2c in low nibbles and 2c + 1 in high ones."""
    q = q & 0xF
    return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128).astype(np.uint8)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """d f16 | dmin f16 | scales[12] | qs[128]."""
    n = rows.shape[0]
    x = rows.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, sc, m, q = _scale_min(x, 15)
    return np.concatenate([d, dmin, _pack_scales(sc, m), _nibbles(q)], axis=1).reshape(n, -1)


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    """d f16 | dmin f16 | scales[12] | qh[32] (bit s of qh[l]: 5th bit of element l of sub-block s) | qs[128]."""
    n = rows.shape[0]
    x = rows.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, sc, m, q = _scale_min(x, 31)
    qh = sum(((q[:, s] >> 4) & 1) << s for s in range(8)).astype(np.uint8)  # [nb, 32]
    return np.concatenate([d, dmin, _pack_scales(sc, m), qh, _nibbles(q)], axis=1).reshape(n, -1)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """ql[128] | qh[64] | scales[16] int8 | d f16: value = d * scale[v // 16] * (q - 32), q 6-bit."""
    n = rows.shape[0]
    x = rows.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(axis=2) / 31  # [nb, 16], symmetric: q - 32 in [-31, 31]
    d_bytes, d = _f16(scale.max(axis=1) / 127)
    sc = np.clip(np.rint(_div(scale, d[:, None])), 0, 127).astype(np.int32)
    step = d[:, None] * sc
    q = (np.clip(np.rint(_div(x, step[:, :, None])), -32, 31) + 32).astype(np.int32).reshape(-1, 2, 4, 32)
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),  # per half: values 0-31 and 64-95
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)  # 32-63, 96-127
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    parts = [ql.astype(np.uint8), qh.reshape(-1, 64).astype(np.uint8), sc.astype(np.int8).view(np.uint8), d_bytes]
    return np.concatenate(parts, axis=1).reshape(n, -1)


QUANTIZE = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
