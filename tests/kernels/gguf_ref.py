"""Independent numpy dequantizers for the GGUF block formats (from the file-format definitions), and random
valid blocks, for checking the C++ kernels. Each returns fp32 [n_blocks * block_elems]."""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
GGML_TYPE = {"q4_0": 2, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}


def _f16(b: np.ndarray) -> np.ndarray:  # [nb, 2] uint8 -> [nb] fp32
    return np.ascontiguousarray(b).view(np.float16).reshape(-1).astype(np.float32)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[nb, 12] packed -> scales [nb, 8], mins [nb, 8] (6 bits each)."""
    s = s.astype(np.int32)
    sc = np.empty((s.shape[0], 8), np.int32)
    mn = np.empty((s.shape[0], 8), np.int32)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def dequant(fmt: str, raw: np.ndarray) -> np.ndarray:
    qk, nbytes = BLOCK[fmt]
    b = raw.reshape(-1, nbytes)
    if fmt == "q8_0":
        return (_f16(b[:, :2])[:, None] * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    if fmt == "q4_0":
        q = b[:, 2:].astype(np.int32)
        v = np.concatenate([q & 0xF, q >> 4], axis=1) - 8
        return (_f16(b[:, :2])[:, None] * v).reshape(-1).astype(np.float32)
    if fmt in ("q4_k", "q5_k"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _scale_min_k4(b[:, 4:16])
        qs = b[:, 48:176] if fmt == "q5_k" else b[:, 16:144]
        qs = qs.astype(np.int32).reshape(-1, 4, 32)  # 4 chunks of 64 values
        q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)  # sub-block s = 2*chunk + (high nibble)
        if fmt == "q5_k":
            qh = b[:, 16:48].astype(np.int32)  # bit s of qh[l] = 5th bit of element l of sub-block s
            q = q + np.stack([((qh >> s) & 1) << 4 for s in range(8)], axis=1)
        v = d[:, None, None] * sc[:, :, None] * q - dmin[:, None, None] * mn[:, :, None]
        return v.reshape(-1).astype(np.float32)
    if fmt == "q6_k":
        ql = b[:, 0:128].astype(np.int32).reshape(-1, 2, 64)
        qh = b[:, 128:192].astype(np.int32).reshape(-1, 2, 32)
        sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 16)
        d = _f16(b[:, 208:210])
        out = np.empty((b.shape[0], 2, 128), np.float32)
        for h in range(2):  # each half: 128 values from 64 ql bytes and 32 qh bytes
            lo, hi, qq = ql[:, h, :32], ql[:, h, 32:], qh[:, h]
            parts = [(lo & 0xF) | ((qq & 3) << 4), (hi & 0xF) | (((qq >> 2) & 3) << 4),
                     (lo >> 4) | (((qq >> 4) & 3) << 4), (hi >> 4) | (((qq >> 6) & 3) << 4)]
            for p, q in enumerate(parts):
                s = sc[:, 8 * h + 2 * p: 8 * h + 2 * p + 2].repeat(16, axis=1)  # one scale per 16 values
                out[:, h, 32 * p: 32 * p + 32] = d[:, None] * s * (q - 32)
        return out.reshape(-1)
    raise ValueError(fmt)


def random_blocks(fmt: str, n_values: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes with sane fp16 scales (no inf/nan); the quants/scales are uniform random bits."""
    qk, nbytes = BLOCK[fmt]
    b = rng.integers(0, 256, size=(n_values // qk, nbytes), dtype=np.uint8)

    def put(off: int, lo: float, hi: float) -> None:
        b[:, off:off + 2] = rng.uniform(lo, hi, size=b.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)

    if fmt in ("q8_0", "q4_0"):
        put(0, 0.002, 0.02)
    elif fmt in ("q4_k", "q5_k"):
        put(0, 0.0005, 0.002)
        put(2, 0.0005, 0.002)
    elif fmt == "q6_k":
        put(208, 0.0002, 0.001)
    return b.reshape(-1)
