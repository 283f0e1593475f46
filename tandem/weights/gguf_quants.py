"""ggml's quantized block types and their dequantizers, vectorized in torch.

Each type stores a row as whole blocks of `block` values in `bytes` bytes. A dequantizer takes the blocks as a
uint8 tensor [B, bytes] and returns float32 [B, block]. The layouts are ggml's (ggml-common.h), field by field
in the docstrings; `d` / `dmin` are float16 super-block scales, K-quants hold 256 values in 8 or 16 sub-blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True, slots=True)
class QuantType:
    id: int
    name: str
    block: int  # values per block
    bytes: int  # bytes per block
    float_dtype: torch.dtype | None = None  # plain float/int types: the torch dtype of the data


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block, as float32 [B, 1]."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[B, n] bytes -> [B, 2n]: the low nibbles of all bytes, then the high nibbles (ggml's Q4 order)."""
    return torch.cat((qs & 0xF, qs >> 4), dim=1)


def _bits(b: torch.Tensor, n: int) -> torch.Tensor:
    """[B, 4] bytes, a little-endian u32 -> [B, n] its bits 0..n-1."""
    h = b.to(torch.int64)
    h = h[:, 0] | h[:, 1] << 8 | h[:, 2] << 16 | h[:, 3] << 24
    return (h[:, None] >> torch.arange(n, device=b.device)) & 1


def deq_q4_0(b):
    """d f16 | qs[16] (two 4-bit values per byte): x = (q - 8) d."""
    return (_nibbles(b[:, 2:18]).float() - 8) * _f16(b, 0)


def deq_q4_1(b):
    """d f16 | m f16 | qs[16]: x = q d + m."""
    return _nibbles(b[:, 4:20]).float() * _f16(b, 0) + _f16(b, 2)


def deq_q5_0(b):
    """d f16 | qh u32 (fifth bits) | qs[16]: x = (q - 16) d."""
    q = _nibbles(b[:, 6:22]).to(torch.int64) | _bits(b[:, 2:6], 32) << 4
    return (q.float() - 16) * _f16(b, 0)


def deq_q5_1(b):
    """d f16 | m f16 | qh u32 | qs[16]: x = q d + m."""
    q = _nibbles(b[:, 8:24]).to(torch.int64) | _bits(b[:, 4:8], 32) << 4
    return q.float() * _f16(b, 0) + _f16(b, 2)


def deq_q8_0(b):
    """d f16 | qs int8[32]: x = q d."""
    return b[:, 2:34].contiguous().view(torch.int8).float() * _f16(b, 0)


def deq_q2_k(b):
    """scales[16] (4-bit scale | 4-bit min) | qs[64] (2-bit) | d f16 | dmin f16; 16 sub-blocks of 16."""
    n = b.shape[0]
    sc = b[:, :16]
    qs = b[:, 16:80].view(n, 2, 1, 32)  # two halves of 128 values
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).reshape(n, 16, 16).float()  # [B, sub-block, 16]: (half, shift, 16 of 32 bytes)
    d = _f16(b, 80)[:, :, None] * (sc & 0xF).float()[:, :, None]
    m = _f16(b, 82)[:, :, None] * (sc >> 4).float()[:, :, None]
    return (d * q - m).reshape(n, QK_K)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 16 6-bit scales from 12 bytes: low 4 bits in bytes 0..7 (two per byte), high 2 bits in 8..11."""
    i = torch.arange(16, device=s.device)
    low = torch.where(i < 8, s[:, i % 8] & 0xF, s[:, i % 8] >> 4)
    high = (s[:, 8 + i % 4] >> (2 * (i // 4)).to(torch.uint8)) & 3
    return (low | high << 4).float() - 32


def deq_q3_k(b):
    """hmask[32] (third bits) | qs[64] (2-bit) | scales[12] (6-bit) | d f16; 16 sub-blocks of 16."""
    n = b.shape[0]
    hm, qs = b[:, :32], b[:, 32:96].view(n, 2, 1, 32)
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).to(torch.int8)  # [B, half, shift, 32]
    hbit = torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 2, 4, 1)  # bit h*4 + j of hmask
    high = (hm.view(n, 1, 1, 32) >> hbit) & 1
    q = (q - 4 * (1 - high).to(torch.int8)).reshape(n, 16, 16).float()
    return (_f16(b, 108)[:, :, None] * _q3_k_scales(b[:, 96:108])[:, :, None] * q).reshape(n, QK_K)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 8 (scale, min) pairs, 6 bits each, packed in 12 bytes (ggml's get_scale_min_k4)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((lo & 63, (hi & 0xF) | (lo >> 6) << 4), dim=1)
    mn = torch.cat((mid & 63, (hi >> 4) | (mid >> 6) << 4), dim=1)
    return sc.float(), mn.float()


def deq_q4_k(b):
    """d f16 | dmin f16 | scales[12] | qs[128]; 8 sub-blocks of 32: x = d sc q - dmin m."""
    n = b.shape[0]
    sc, mn = _k4_scales(b[:, 4:16])
    qs = b[:, 16:144].view(n, 4, 1, 32)
    q = ((qs >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2, 1)) & 0xF).reshape(n, 8, 32)
    out = _f16(b, 0)[:, :, None] * sc[:, :, None] * q.float() - _f16(b, 2)[:, :, None] * mn[:, :, None]
    return out.reshape(n, QK_K)


def deq_q5_k(b):
    """d f16 | dmin f16 | scales[12] | qh[32] (fifth bits) | qs[128]; 8 sub-blocks of 32."""
    n = b.shape[0]
    sc, mn = _k4_scales(b[:, 4:16])
    qs = b[:, 48:176].view(n, 4, 1, 32)
    q = ((qs >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2, 1)) & 0xF).reshape(n, 8, 32)
    high = (b[:, 16:48].view(n, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1
    q = (q | high << 4).float()
    out = _f16(b, 0)[:, :, None] * sc[:, :, None] * q - _f16(b, 2)[:, :, None] * mn[:, :, None]
    return out.reshape(n, QK_K)


def deq_q6_k(b):
    """ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales int8[16] | d f16; 16 sub-blocks of 16: x = d sc (q-32)."""
    n = b.shape[0]
    ql = b[:, :128].view(n, 2, 1, 2, 32)  # [B, half, nibble, 2, 32] after the shift below
    low = (ql >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2, 1, 1)) & 0xF
    qh = b[:, 128:192].view(n, 2, 1, 32)
    high = (qh >> torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)) & 3
    q = (low.reshape(n, 2, 4, 32) | high << 4).to(torch.int8) - 32  # [B, half, quarter, 32]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    return (_f16(b, 208)[:, :, None] * sc[:, :, None] * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def deq_iq4_nl(b):
    """d f16 | qs[16]: x = d table[q] with ggml's non-linear 4-bit table."""
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=b.device)
    return table[_nibbles(b[:, 2:18]).long()] * _f16(b, 0)


def deq_iq4_xs(b):
    """d f16 | scales_h u16 | scales_l[4] | qs[128]; 8 sub-blocks of 32 with 6-bit scales: x = d (s-32) table[q]."""
    n = b.shape[0]
    i = torch.arange(8, device=b.device)
    sh = b[:, 2].to(torch.int64) | b[:, 3].to(torch.int64) << 8
    low = (b[:, 4 + i // 2].to(torch.int64) >> (4 * (i % 2))) & 0xF
    ls = (low | ((sh[:, None] >> (2 * i)) & 3) << 4).float() - 32  # [B, 8]
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=b.device)
    q = _nibbles(b[:, 8:136].reshape(n * 8, 16)).view(n, 8, 32)
    return (_f16(b, 0)[:, :, None] * ls[:, :, None] * table[q.long()]).reshape(n, QK_K)


TYPES: dict[int, QuantType] = {}
DEQUANT = {}


def _register(id_: int, name: str, block: int, nbytes: int, fn=None, float_dtype=None) -> None:
    TYPES[id_] = QuantType(id_, name, block, nbytes, float_dtype)
    if fn is not None:
        DEQUANT[id_] = fn


_register(0, "F32", 1, 4, float_dtype=torch.float32)
_register(1, "F16", 1, 2, float_dtype=torch.float16)
_register(2, "Q4_0", 32, 18, deq_q4_0)
_register(3, "Q4_1", 32, 20, deq_q4_1)
_register(6, "Q5_0", 32, 22, deq_q5_0)
_register(7, "Q5_1", 32, 24, deq_q5_1)
_register(8, "Q8_0", 32, 34, deq_q8_0)
_register(10, "Q2_K", QK_K, 84, deq_q2_k)
_register(11, "Q3_K", QK_K, 110, deq_q3_k)
_register(12, "Q4_K", QK_K, 144, deq_q4_k)
_register(13, "Q5_K", QK_K, 176, deq_q5_k)
_register(14, "Q6_K", QK_K, 210, deq_q6_k)
_register(20, "IQ4_NL", 32, 18, deq_iq4_nl)
_register(23, "IQ4_XS", QK_K, 136, deq_iq4_xs)
_register(24, "I8", 1, 1, float_dtype=torch.int8)
_register(25, "I16", 1, 2, float_dtype=torch.int16)
_register(26, "I32", 1, 4, float_dtype=torch.int32)
_register(27, "I64", 1, 8, float_dtype=torch.int64)
_register(28, "F64", 1, 8, float_dtype=torch.float64)
_register(30, "BF16", 1, 2, float_dtype=torch.bfloat16)
NAMES = {t.name: t.id for t in TYPES.values()}
# formats the CPU expert kernels ([C]) take as they are
KERNEL_TYPES = frozenset(NAMES[n] for n in ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"))

ROWS_PER_CHUNK = 1 << 20  # values dequantized at a time, bounding float32 scratch at 4 MiB


def dequantize(data: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", chunk_values: int = ROWS_PER_CHUNK) -> torch.Tensor:
    """Raw bytes `data` (uint8) of a tensor of `shape` and `ggml_type` -> a fresh tensor of `dtype` on `device`,
    `chunk_values` values at a time (the float32 scratch)."""
    qt = TYPES[ggml_type]
    if qt.float_dtype is not None:
        t = data.view(qt.float_dtype).view(shape)
        return t.to(device=device, dtype=dtype, copy=True)
    fn = DEQUANT[ggml_type]
    blocks = data.view(-1, qt.bytes)
    out = torch.empty(blocks.shape[0] * qt.block, dtype=dtype, device=device)
    step = max(1, chunk_values // qt.block)
    for i in range(0, blocks.shape[0], step):
        chunk = blocks[i : i + step].to(device)
        out[i * qt.block : (i + step) * qt.block] = fn(chunk).reshape(-1).to(dtype)
    return out.view(shape)
