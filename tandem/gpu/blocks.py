"""Quantized weight blocks shared by the CPU and the GPU kernels, and their conversions in plain torch.

The GPU kernels read the same blocks as the C++ CPU kernels (csrc/tandem/quants.h), byte for byte, so CPU
experts stream to the GPU as they are (layer-wise prefill) and a checkpoint is quantized once, on whatever
device holds it. Every function here is device-agnostic torch: it runs on the GPU at load and on the CPU in
tests. Formats (values per block, bytes per block):

    q8_0       32, 34   fp16 d | int8 q[32]                        w = d q            ("int8")
    q4_0       32, 18   fp16 d | qs[16]: j low, j+16 high nibble   w = d (q - 8)      (int4 symmetric, group 32)
    int4_g32  128, 80   fp16 d[4] | fp16 m[4] | qs[64]: group g in qs[16g..16g+15], j low / j+16 high
                                                                  w = d[g] q + m[g]  (int4 scale + min, group 32)
    int4_g128 128, 68   fp16 d | fp16 m | qs[64]: j low, j+64 high  w = d q + m      (int4 scale + min, group 128)
    q8_0p      32, 34   a row: int8 q[K] | fp16 d[K / 32]          w = d q            (q8_0 re-laid, GPU linears)
    fp8_e4m3  128, 132  a row: fp8 e4m3 q[K] | fp32 s[K / 128]     w = s q            (FP8 checkpoints, GPU linears)
    bf16 / fp16 / fp32: a plain float tensor.

GGUF's K-quants (q4_k, q5_k, q6_k: 256 values in 144, 176, 210 bytes, ggml's layouts, tandem.weights.gguf_quants)
stay as the file stores them where only dequantization reads them (a long prefill's dense path,
tandem.gpu.dequant); the grouped GEMM reads them converted (to_grouped).

A weight [*, N, K] (leading dims: experts) is stored as uint8 [*, N, K / block * bytes]: each output row is
whole blocks along K, as ggml stores rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.weights import gguf_quants as gq

# format -> (values per block, bytes per block, kernel code)
BLOCK_FORMATS: dict[str, tuple[int, int, int]] = {
    "q8_0": (32, 34, 1),
    "q4_0": (32, 18, 2),
    "int4_g32": (128, 80, 3),
    "int4_g128": (128, 68, 4),
}
FLOAT_FORMATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALIASES = {"int8": "q8_0", "int4": "int4_g32", "int4_sym": "q4_0", "int4_sym_g32": "q4_0", "float32": "fp32",
           "bfloat16": "bf16", "float16": "fp16"}
# ggml type id -> the block format it already is (zero conversion)
GGUF_SAME = {8: "q8_0", 2: "q4_0"}
# GGUF K-quants kept as they are for the dequantizer only (not weight formats of the grouped GEMM): format ->
# (values per block, bytes per block, kernel code), and ggml type id -> format
KQUANT_FORMATS: dict[str, tuple[int, int, int]] = {"q4_k": (256, 144, 5), "q5_k": (256, 176, 6),
                                                   "q6_k": (256, 210, 7)}
GGUF_KQUANT = {12: "q4_k", 13: "q5_k", 14: "q6_k"}
KQUANT_GGUF = {f: t for t, f in GGUF_KQUANT.items()}
# GPU linears only (never a rule's weight_format, never an experts format): q8_0 re-laid per row as int8 q[K] then
# fp16 d[K / 32], the same bytes per row as q8_0, so a batch-1 GEMV (tandem.gpu.gemv) loads the values 16
# aligned bytes at a time; q8_0's 34-byte blocks allow 2-byte loads only
ROW_FORMATS: dict[str, tuple[int, int, int]] = {"q8_0p": (32, 34, 8), "fp8_e4m3": (128, 132, 9)}
# linear.fp8: FP8 E4M3 values with 128 x 128 block scales (DeepSeek-V3's and Qwen3's FP8 checkpoints, their
# weight_scale_inv). Each row carries its blocks' fp32 scales after its values (a block's scale repeated on its 128
# rows: +3% bytes) so rows stay independent: projections join along N, a GEMV takes any rows
FP8 = "fp8_e4m3"
FP8_BLOCK = 128
FP8_MAX = 448.0  # the largest E4M3 value


def canonical(fmt: str, group_size: int | None = None) -> str:
    """A format name as the kernels know it ("int8" -> "q8_0", "int4" + group 128 -> "int4_g128")."""
    f = ALIASES.get(fmt.lower(), fmt.lower())
    if f == "int4_g32" and group_size == 128 and fmt.lower() == "int4":
        f = "int4_g128"
    if f not in BLOCK_FORMATS and f not in FLOAT_FORMATS:
        known = ", ".join([*BLOCK_FORMATS, *FLOAT_FORMATS, *ALIASES])
        raise ValueError(f"weight_format {fmt!r} is not a GPU weight format; use one of {known}")
    return f


def check_shape(fmt: str, k: int, what: str = "weight") -> None:
    if fmt in BLOCK_FORMATS and k % BLOCK_FORMATS[fmt][0]:
        raise ValueError(f"{what}: {k} input features is not a multiple of {fmt}'s block of "
                         f"{BLOCK_FORMATS[fmt][0]}; use q8_0 or q4_0 (blocks of 32) or bf16")


@dataclass
class QuantTensor:
    """A weight [*, N, K] in one format: `data` uint8 [*, N, row_bytes] (block formats) or float [*, N, K]."""

    fmt: str
    data: torch.Tensor
    shape: tuple[int, ...]

    @property
    def n(self) -> int:
        return self.shape[-2]

    @property
    def k(self) -> int:
        return self.shape[-1]

    @property
    def code(self) -> int:
        return _layout(self.fmt)[2] if self.fmt not in FLOAT_FORMATS else 0

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the kernels see it, [*, N, K] in `dtype`."""
        if self.fmt in FLOAT_FORMATS:
            return self.data.to(dtype)
        return dequantize(self.data, self.fmt, self.shape).to(dtype)

    def __getitem__(self, e) -> QuantTensor:
        """Expert e (or a slice of experts) of a stacked weight."""
        data = self.data[e]
        return QuantTensor(self.fmt, data, tuple(data.shape[:-1]) + (self.shape[-1],))

    def to(self, device) -> QuantTensor:
        return QuantTensor(self.fmt, self.data.to(device), self.shape)


def _layout(fmt: str) -> tuple[int, int, int]:
    return KQUANT_FORMATS.get(fmt) or ROW_FORMATS.get(fmt) or BLOCK_FORMATS[fmt]


def row_bytes(fmt: str, k: int) -> int:
    blk, nbytes, _ = _layout(fmt)
    return k // blk * nbytes


# ---------------------------------------------------------------------- quantize (the C++ quantizers, in torch)


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 [..., n] -> its little-endian bytes [..., 2n]."""
    return t.contiguous().view(torch.uint8)


def _pack_halves(q: torch.Tensor) -> torch.Tensor:
    """[..., 2h] nibbles -> [..., h] bytes: element j low, element j + h high (ggml's Q4 order)."""
    h = q.shape[-1] // 2
    return q[..., :h] | (q[..., h:] << 4)


def _minmax_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., G] fp32 -> fp16 scale d, fp16 min m, nibbles q [..., G] uint8 (round half to even, as C's nearbyint)."""
    lo, hi = x.amin(-1), x.amax(-1)
    d, m = ((hi - lo) / 15).half(), lo.half()
    df, mf = d.float(), m.float()
    inv = torch.where(df > 0, 1 / df, torch.zeros_like(df))
    q = torch.round((x - mf[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return d, m, q


def quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Float w [*, N, K] -> blocks uint8 [*, N, row_bytes]; equal to the C++ quantizer's bytes."""
    fmt = canonical(fmt)
    if fmt in FLOAT_FORMATS:
        return w.to(FLOAT_FORMATS[fmt]).contiguous()
    *lead, k = w.shape
    check_shape(fmt, k)
    blk, _, _ = BLOCK_FORMATS[fmt]
    x = w.reshape(-1, k // blk, blk).float()  # [R, B, blk]
    if fmt == "q8_0":
        d = (x.abs().amax(-1) / 127).half()
        df = d.float()
        inv = torch.where(df > 0, 1 / df, torch.zeros_like(df))
        q = torch.round(x * inv[..., None]).clamp(-127, 127).to(torch.int8).view(torch.uint8)
        out = torch.cat((_f16_bytes(d[..., None]), q), -1)
    elif fmt == "q4_0":
        # ggml: d = max / -8 with max the value of largest magnitude; q = min(15, trunc(x / d + 8.5))
        idx = x.abs().argmax(-1, keepdim=True)
        df = x.gather(-1, idx)[..., 0] / -8
        inv = torch.where(df != 0, 1 / df, torch.zeros_like(df))  # ggml: against the unrounded scale
        d = df.half()
        q = (x * inv[..., None] + 8.5).trunc().clamp(0, 15).to(torch.uint8)
        out = torch.cat((_f16_bytes(d[..., None]), _pack_halves(q)), -1)
    elif fmt == "int4_g32":
        d, m, q = _minmax_groups(x.view(*x.shape[:2], 4, 32))  # [R, B, 4], [R, B, 4, 32]
        out = torch.cat((_f16_bytes(d), _f16_bytes(m), _pack_halves(q).flatten(-2)), -1)
    else:  # int4_g128
        d, m, q = _minmax_groups(x)
        out = torch.cat((_f16_bytes(d[..., None]), _f16_bytes(m[..., None]), _pack_halves(q)), -1)
    return out.reshape(*lead, -1)


# ---------------------------------------------------------------------- dequantize (reference, any device)


def _f16_at(b: torch.Tensor, at: int, n: int = 1) -> torch.Tensor:
    """n fp16 values at byte `at` of each block [..., bytes] -> fp32 [..., n]."""
    return b[..., at : at + 2 * n].contiguous().view(torch.float16).float()


def _unpack_halves(qs: torch.Tensor) -> torch.Tensor:
    """[..., h] bytes -> [..., 2h] nibbles: low nibbles first, then high."""
    return torch.cat((qs & 0xF, qs >> 4), -1)


def dequantize(data: torch.Tensor, fmt: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Blocks uint8 [*, N, row_bytes] of `fmt` -> fp32 [*shape]."""
    if fmt in KQUANT_FORMATS:
        t = gq.TYPES[KQUANT_GGUF[fmt]]
        return gq.DEQUANT[t.id](data.reshape(-1, t.bytes)).reshape(shape)
    if fmt == FP8:
        k = shape[-1]
        rows = data.reshape(-1, data.shape[-1])
        q = rows[:, :k].contiguous().view(torch.float8_e4m3fn).float().view(-1, k // FP8_BLOCK, FP8_BLOCK)
        return (q * rows[:, k:].contiguous().view(torch.float32)[..., None]).reshape(shape)
    if fmt == "q8_0p":
        k = shape[-1]
        rows = data.reshape(-1, data.shape[-1])
        q = rows[:, :k].contiguous().view(torch.int8).float().view(-1, k // 32, 32)
        return (q * rows[:, k:].contiguous().view(torch.float16).float()[..., None]).reshape(shape)
    fmt = canonical(fmt)
    blk, nbytes, _ = BLOCK_FORMATS[fmt]
    b = data.reshape(-1, nbytes)
    if fmt == "q8_0":
        w = b[:, 2:].contiguous().view(torch.int8).float() * _f16_at(b, 0)
    elif fmt == "q4_0":
        w = (_unpack_halves(b[:, 2:]).float() - 8) * _f16_at(b, 0)
    elif fmt == "int4_g32":
        q = _unpack_halves(b[:, 16:].reshape(-1, 4, 16)).float()  # [B, 4, 32]
        w = q * _f16_at(b, 0, 4)[..., None] + _f16_at(b, 8, 4)[..., None]
    else:
        w = _unpack_halves(b[:, 4:]).float() * _f16_at(b, 0) + _f16_at(b, 2)
    return w.reshape(shape)


# ---------------------------------------------------------------------- GGUF blocks -> kernel blocks


def _q4_k_to_int4_g32(b: torch.Tensor) -> torch.Tensor:
    """Q4_K blocks [B, 144] -> int4_g32 blocks [2B, 80]: sub-block s of 32 gets d = fp16(d sc_s), m = -fp16(dmin
    m_s); the nibbles are the same values, re-laid. Exact but for the fp16 rounding of d sc_s and dmin m_s."""
    n = b.shape[0]
    sc, mn = gq._k4_scales(b[:, 4:16])  # [B, 8] each
    d = (_f16_at(b, 0) * sc).half().view(n * 2, 4)
    m = (-_f16_at(b, 2) * mn).half().view(n * 2, 4)
    qs = b[:, 16:144].reshape(n, 4, 1, 32)  # 4 chunks of 64 values: low nibbles = first 32, high = next 32
    q = ((qs >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2, 1)) & 0xF)
    q = q.reshape(n * 2, 4, 32)  # [2B, group, 32]
    return torch.cat((_f16_bytes(d), _f16_bytes(m), _pack_halves(q).flatten(-2)), -1)


def q4_1_to_int4_g32(b: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks [4B, 20] (d, m, qs[16] in the same nibble order) -> int4_g32 [B, 80]: exact."""
    g = b.reshape(-1, 4, 20)
    return torch.cat((g[:, :, 0:2].reshape(-1, 8), g[:, :, 2:4].reshape(-1, 8), g[:, :, 4:20].reshape(-1, 64)), -1)


# ggml type id -> (kernel format, converter of [blocks, bytes] uint8) for the exact conversions
GGUF_CONVERT = {12: ("int4_g32", _q4_k_to_int4_g32), 3: ("int4_g32", q4_1_to_int4_g32)}


def gguf_natural_format(ggml_type: int, k: int) -> str:
    """The kernel format a GGUF tensor converts to without requantizing (or q8_0 when it must)."""
    if ggml_type in GGUF_SAME:
        return GGUF_SAME[ggml_type]
    if ggml_type in GGUF_CONVERT and k % 128 == 0:
        return GGUF_CONVERT[ggml_type][0]
    if ggml_type in (0, 1, 30):
        return {0: "fp32", 1: "fp16", 30: "bf16"}[ggml_type]
    return "q8_0"  # 5/6-bit and others: dequantized and requantized to 8 bits (error <= half an int8 step)


def from_gguf(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], fmt: str | None,
              device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> QuantTensor:
    """GGUF bytes of a tensor [*, N, K] -> a QuantTensor in `fmt` (None: its natural format) on `device`.

    The bytes move to the device first; every conversion runs there. Same format: a copy. Q4_K / Q4_1 to
    int4_g32: a relayout. Anything else: dequantized and quantized on the device.
    """
    k = shape[-1]
    fmt = canonical(fmt) if fmt else gguf_natural_format(ggml_type, k)
    qt = gq.TYPES[ggml_type]
    data = raw.to(device)
    if qt.float_dtype is not None:
        w = data.view(qt.float_dtype).view(shape)
        return QuantTensor(fmt, quantize(w, fmt) if fmt in BLOCK_FORMATS else w.to(FLOAT_FORMATS[fmt]), shape)
    if GGUF_SAME.get(ggml_type) == fmt:
        return QuantTensor(fmt, data.view(*shape[:-1], -1).clone(), shape)
    if ggml_type in GGUF_CONVERT and GGUF_CONVERT[ggml_type][0] == fmt and k % 128 == 0:
        out = GGUF_CONVERT[ggml_type][1](data.view(-1, qt.bytes))
        return QuantTensor(fmt, out.reshape(*shape[:-1], -1), shape)
    if fmt in FLOAT_FORMATS:
        return QuantTensor(fmt, gq.dequantize(data, ggml_type, shape, FLOAT_FORMATS[fmt], device, CHUNK_VALUES),
                           shape)
    return QuantTensor(fmt, _requantize(data, ggml_type, shape, fmt), shape)


CHUNK_VALUES = 1 << 26  # values a GGUF conversion dequantizes at a time on the device (256 MiB of float32)


def _requantize(data: torch.Tensor, ggml_type: int, shape: tuple[int, ...], fmt: str) -> torch.Tensor:
    """GGUF bytes -> blocks of `fmt`, a chunk of rows at a time (float32 scratch of CHUNK_VALUES, few launches)."""
    qt, k = gq.TYPES[ggml_type], shape[-1]
    rows = data.numel() // (k // qt.block * qt.bytes)
    src = data.view(rows, -1)
    out = torch.empty(rows, row_bytes(fmt, k), dtype=torch.uint8, device=data.device)
    step = max(1, CHUNK_VALUES // k)
    kq = GGUF_KQUANT.get(ggml_type)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        if kq is not None:  # one Triton launch on a GPU (tandem.gpu.dequant), the torch dequantizer on the CPU
            from tandem.gpu.dequant import dequantize_into

            w = dequantize_into(QuantTensor(kq, src[r : r + n], (n, k)),
                                torch.empty(n, k, dtype=torch.float32, device=data.device))
        else:
            w = gq.dequantize(src[r : r + n].reshape(-1), ggml_type, (n, k), torch.float32, data.device,
                              CHUNK_VALUES)
        out[r : r + n] = quantize(w, fmt)
    return out.view(*shape[:-1], -1)


def q8_0_planar(w: QuantTensor) -> QuantTensor:
    """A q8_0 weight re-laid as q8_0p on its device (each row: its int8 values, then its fp16 scales): exact."""
    if w.fmt != "q8_0":
        raise ValueError(f"q8_0_planar: the weight is {w.fmt}, not q8_0")
    b = w.data.reshape(-1, w.k // 32, 34)
    rows = torch.cat((b[..., 2:].reshape(b.shape[0], w.k), b[..., :2].reshape(b.shape[0], -1)), -1)
    return QuantTensor("q8_0p", rows.view(*w.data.shape), w.shape)


def fp8_rows(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK),
             what: str = "weight") -> QuantTensor:
    """FP8 E4M3 values q [N, K] and their block scales [ceil(N / 128), K / 128] (a checkpoint's weight_scale_inv:
    w = q * scale) as an fp8_e4m3 weight on q's device: the same values, nothing requantized."""
    n, k = q.shape
    if tuple(block) != (FP8_BLOCK, FP8_BLOCK) or k % FP8_BLOCK:
        raise ValueError(f"{what}: FP8 weights run with 128 x 128 block scales over whole blocks of 128 input "
                         f"features; this one has blocks {list(block)} and {k} input features (use linear.torch)")
    rb, cb = -(-n // FP8_BLOCK), k // FP8_BLOCK
    if tuple(scale.shape) != (rb, cb):
        raise ValueError(f"{what}: FP8 scales have shape {list(scale.shape)}, a [{n}, {k}] weight in 128 x 128 "
                         f"blocks needs [{rb}, {cb}]")
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{what}: FP8 values must be float8_e4m3fn, got {q.dtype}")
    s = scale.to(q.device, torch.float32).repeat_interleave(FP8_BLOCK, 0)[:n]  # [N, K / 128]: each row its blocks'
    return QuantTensor(FP8, torch.cat((q.contiguous().view(torch.uint8), s.contiguous().view(torch.uint8)), -1),
                       (n, k))


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] (K % 128 == 0) as FP8 E4M3 values and 128 x 128 block scales, as FP8 checkpoints
    quantize: scale = the block's largest magnitude / 448, values rounded to nearest (a zero block: scale 1)."""
    n, k = w.shape
    rb = -(-n // FP8_BLOCK)
    wp = torch.zeros(rb * FP8_BLOCK, k, dtype=torch.float32, device=w.device)
    wp[:n] = w
    blocks = wp.view(rb, FP8_BLOCK, k // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # [rb, K / 128]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rb * FP8_BLOCK, k)[:n], scale


def to_grouped(w: QuantTensor) -> QuantTensor:
    """w in a format the grouped GEMM reads: K-quants converted on their device as from_gguf converts them (q4_k to
    int4_g32, a relayout; q5_k / q6_k to q8_0); any other format as it is."""
    if w.fmt not in KQUANT_FORMATS:
        return w
    return from_gguf(w.data.reshape(-1), KQUANT_GGUF[w.fmt], w.shape, None, w.device)


def from_float(w: torch.Tensor, fmt: str) -> QuantTensor:
    """A float weight [*, N, K] quantized on its own device."""
    if fmt == FP8:
        if w.dim() != 2 or w.shape[-1] % FP8_BLOCK:
            raise ValueError(f"fp8_e4m3 takes a [N, K] weight with K % 128 == 0, got {list(w.shape)}")
        return fp8_rows(*fp8_quantize(w))
    fmt = canonical(fmt)
    return QuantTensor(fmt, quantize(w, fmt), tuple(w.shape))
