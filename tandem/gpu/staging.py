"""The hybrid MoE layer's hand-off between the GPU and the pinned host buffers of the CPU experts, as kernels.

A decode step's layer crosses twice: x, topk ids and weights to the host, the experts' output back. As copies that
is three device-to-host memcpys (plus the router's softmax / top-k / renormalize kernels before them) and one
host-to-device memcpy followed by the adds; each is a node of a few microseconds, and at batch 1 they sit between
the GPU's work and the CPU's, one after the other. Here the GPU's SMs read and write the pinned buffers directly
(mapped host memory: with unified addressing a pinned tensor's address is valid on the device):

    stage_out     x, ids, weights -> pinned x, ids (int64), weights (fp32)             one launch
    route_out     router logits [N, E] -> softmax, top-k, renormalize -> pinned ids,
                  weights; x -> pinned x                                               one launch
    stage_in      pinned out (+ up to two device tensors) -> a device tensor            one launch

Same arithmetic as the torch path (softmax in fp32, top-k of the probabilities, renormalized by their sum), so ids
are equal and weights equal to an ulp; the kernels never read a value on the host, so they run inside CUDA-graph
capture. TANDEM_STAGING_KERNELS=0 keeps the memcpy path (A/B measurements).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None

ENABLED = triton is not None and os.environ.get("TANDEM_STAGING_KERNELS", "1") != "0"
# TANDEM_ROUTE_ENTRY=0: the layer's residual add + norm, the router GEMM and route_out as three launches (A/B)
ENTRY = ENABLED and os.environ.get("TANDEM_ROUTE_ENTRY", "1") != "0"
ENTRY_ROWS = 16  # decode batches; every row's programs read the whole router weight, so larger batches don't gain
ENTRY_DIM = 8192  # a row in one program's registers (16 warps)
EXPERTS_PER_PROGRAM = 4  # 32 programs for 128 experts, 64 for 256: the router's weight read spread over SMs
_counters: dict[torch.device, torch.Tensor] = {}
MAX_EXPERTS = 1024  # one router row in registers
BLOCK_D = 1024  # hidden values one program moves
_PRECISE_EXP = os.environ.get("TRITON_INTERPRET", "0") != "1"  # the interpreter has no libdevice

if triton is not None:

    @triton.jit
    def _top_k(choice, score, e, K, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        """The K largest of `choice` [BLOCK_E] (lowest index on ties; -inf never taken first) and `score` there."""
        slots = tl.arange(0, BLOCK_K)
        top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
        top_i = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in range(K):
            m = tl.max(choice, 0)
            idx = tl.min(tl.where(choice == m, e, BLOCK_E), 0)
            top_w = tl.where(slots == j, tl.sum(tl.where(e == idx, score, 0.0), 0), top_w)
            top_i = tl.where(slots == j, idx.to(tl.int64), top_i)
            choice = tl.where(e == idx, float("-inf"), choice)
        return top_w, top_i

    @triton.jit
    def _top_k_packed(p, valid, e, K, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        """_top_k for scores p >= 0 (where valid) that are also the weights: each pick is one max over the key
        (p's bits << 32 | BLOCK_E - 1 - e), whose order is p's with the lowest index first on ties, and p is read
        back from it: one reduction per pick instead of three."""
        bits = p.to(tl.int32, bitcast=True).to(tl.int64)  # a float >= 0: its bits order as its values
        key = tl.where(valid, (bits << 32) + (BLOCK_E - 1 - e), -1)
        slots = tl.arange(0, BLOCK_K)
        top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
        top_i = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in range(K):
            m = tl.max(key, 0)
            hi = m >> 32
            idx = BLOCK_E - 1 - (m - (hi << 32))
            top_w = tl.where(slots == j, hi.to(tl.int32).to(tl.float32, bitcast=True), top_w)
            top_i = tl.where(slots == j, idx, top_i)
            key = tl.where(e == idx, -1, key)
        return top_w, top_i

    @triton.jit
    def _route_row(logits_ptr, ids_ptr, w_ptr, row, E, K, stride_l, RENORM: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISE: tl.constexpr):
        """softmax(logits[row]) in fp32, its top K (largest first, lowest index on ties), optionally renormalized."""
        e = tl.arange(0, BLOCK_E)
        z = tl.load(logits_ptr + row.to(tl.int64) * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
        _route_z(z, e, ids_ptr, w_ptr, row, E, K, RENORM, BLOCK_E, BLOCK_K, PRECISE)

    @triton.jit
    def _route_z(z, e, ids_ptr, w_ptr, row, E, K, RENORM: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISE: tl.constexpr):
        """_route_row on the row's logits z [BLOCK_E] fp32 (-inf past E) at experts e."""
        if PRECISE:  # libdevice's expf, as torch's softmax
            p = libdevice.exp(z - tl.max(z, 0))
        else:
            p = tl.exp(z - tl.max(z, 0))
        p = p / tl.sum(p, 0)
        slots = tl.arange(0, BLOCK_K)
        top_w, top_i = _top_k_packed(p, e < E, e, K, BLOCK_E, BLOCK_K)
        if RENORM:
            top_w = top_w / tl.sum(tl.where(slots < K, top_w, 0.0), 0)
        out = row.to(tl.int64) * K + slots
        tl.store(ids_ptr + out, top_i, mask=slots < K)
        tl.store(w_ptr + out, top_w, mask=slots < K)

    @triton.jit
    def _stage_out_kernel(x_ptr, ids_ptr, w_ptr, hx_ptr, hids_ptr, hw_ptr, D, K, stride_x, stride_i, stride_w,
                          ROUTE: tl.constexpr, RENORM: tl.constexpr, E, BLOCK_E: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
        """Program (row, c): x[row, c-th chunk] -> hx; program (row, 0) also writes the row's ids and weights, from
        ids/w as given or (ROUTE) from the router logits at ids_ptr."""
        row, c = tl.program_id(0), tl.program_id(1)
        cols = c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < D)
        tl.store(hx_ptr + row.to(tl.int64) * D + cols, x.to(hx_ptr.dtype.element_ty), mask=cols < D)
        if c == 0:
            if ROUTE:
                _route_row(ids_ptr, hids_ptr, hw_ptr, row, E, K, stride_i, RENORM, BLOCK_E, BLOCK_K, PRECISE)
            else:
                slots = tl.arange(0, BLOCK_K)
                i = tl.load(ids_ptr + row.to(tl.int64) * stride_i + slots, mask=slots < K)
                w = tl.load(w_ptr + row.to(tl.int64) * stride_w + slots, mask=slots < K)
                out = row.to(tl.int64) * K + slots
                tl.store(hids_ptr + out, i.to(tl.int64), mask=slots < K)
                tl.store(hw_ptr + out, w.to(tl.float32), mask=slots < K)

    @triton.jit
    def _stage_in_kernel(h_ptr, a_ptr, b_ptr, y_ptr, D, HAS_A: tl.constexpr, HAS_B: tl.constexpr,
                         BLOCK: tl.constexpr):
        """y[row, chunk] = (h [+ a] [+ b]) in y's dtype; h is read once from host memory, the adds in fp32 as torch
        does them for bf16 (each sum rounded to y's dtype, in the reference's order)."""
        row, c = tl.program_id(0), tl.program_id(1)
        cols = c * BLOCK + tl.arange(0, BLOCK)
        at = row.to(tl.int64) * D + cols
        ty = y_ptr.dtype.element_ty
        y = tl.load(h_ptr + at, mask=cols < D, cache_modifier=".cv").to(ty)  # host memory the CPU just wrote
        if HAS_A:
            y = (y.to(tl.float32) + tl.load(a_ptr + at, mask=cols < D).to(tl.float32)).to(ty)
        if HAS_B:
            y = (y.to(tl.float32) + tl.load(b_ptr + at, mask=cols < D).to(tl.float32)).to(ty)
        tl.store(y_ptr + at, y, mask=cols < D)


    @triton.jit
    def _route_grouped_kernel(x_ptr, logits_ptr, bias_ptr, hx_ptr, hids_ptr, hw_ptr, D, E, K, TOPK_GROUP,
                              stride_x, stride_l, scale_w, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                              GROUPS: tl.constexpr, TOP2: tl.constexpr, RENORM: tl.constexpr,
                              BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
                              PRECISE: tl.constexpr):
        """DeepSeek's MoEGate after its fp32 GEMM, for row `row` (program (row, 0)); every program (row, c) also
        moves x's c-th chunk. GROUPS > 1: the experts in GROUPS equal groups, of which TOPK_GROUP are kept by their
        best score (TOP2: the sum of their two best, noaux_tc) before the top K."""
        row, c = tl.program_id(0), tl.program_id(1)
        cols = c * BLOCK + tl.arange(0, BLOCK)
        xv = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < D)
        tl.store(hx_ptr + row.to(tl.int64) * D + cols, xv.to(hx_ptr.dtype.element_ty), mask=cols < D)
        if c == 0:
            e = tl.arange(0, BLOCK_E)
            z = tl.load(logits_ptr + row.to(tl.int64) * stride_l + e, mask=e < E, other=float("-inf"))
            _route_grouped_z(z, e, bias_ptr, hids_ptr, hw_ptr, row, E, K, TOPK_GROUP, scale_w, SIGMOID, HAS_BIAS,
                             GROUPS, TOP2, RENORM, BLOCK_E, BLOCK_K, PRECISE)

    @triton.jit
    def _route_grouped_z(z, e, bias_ptr, hids_ptr, hw_ptr, row, E, K, TOPK_GROUP, scale_w, SIGMOID: tl.constexpr,
                         HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr, TOP2: tl.constexpr, RENORM: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PRECISE: tl.constexpr):
        """_route_grouped_kernel's gate on the row's fp32 logits z [BLOCK_E] at experts e."""
        if SIGMOID:
            if PRECISE:
                sc = 1.0 / (1.0 + libdevice.exp(-z))
            else:
                sc = 1.0 / (1.0 + tl.exp(-z))
        else:
            if PRECISE:
                sc = libdevice.exp(z - tl.max(z, 0))
            else:
                sc = tl.exp(z - tl.max(z, 0))
            sc = sc / tl.sum(sc, 0)
        sc = tl.where(e < E, sc, 0.0)
        choice = sc
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + e, mask=e < E, other=0.0)
        choice = tl.where(e < E, choice, float("-inf"))
        if GROUPS > 1:
            g2 = tl.reshape(choice, (GROUPS, BLOCK_E // GROUPS))
            col = tl.arange(0, BLOCK_E // GROUPS)
            best = tl.max(g2, 1)
            if TOP2:  # the group's two best scores (the first best taken once)
                first = tl.min(tl.where(g2 == best[:, None], col[None, :], BLOCK_E), 1)
                best = best + tl.max(tl.where(col[None, :] == first[:, None], float("-inf"), g2), 1)
            gi = tl.arange(0, GROUPS)
            keep = gi < 0
            for _ in range(TOPK_GROUP):
                top = tl.max(best, 0)
                pick = tl.min(tl.where(best == top, gi, GROUPS), 0)
                keep = keep | (gi == pick)
                best = tl.where(gi == pick, float("-inf"), best)
            choice = tl.reshape(tl.where(keep[:, None], g2, float("-inf")), (BLOCK_E,))
        slots = tl.arange(0, BLOCK_K)
        top_w, top_i = _top_k(choice, sc, e, K, BLOCK_E, BLOCK_K)
        if RENORM:
            top_w = top_w / (tl.sum(tl.where(slots < K, top_w, 0.0), 0) + 1e-20)
        top_w = top_w * scale_w
        out = row.to(tl.int64) * K + slots
        tl.store(hids_ptr + out, top_i, mask=slots < K)
        tl.store(hw_ptr + out, top_w, mask=slots < K)

    @triton.jit
    def _route_entry_kernel(h_ptr, a_ptr, nw_ptr, gw_ptr, bias_ptr, hout_ptr, x_ptr, logits_ptr, cnt_ptr, hx_ptr,
                            hids_ptr, hw_ptr, D: tl.constexpr, E, K, TOPK_GROUP, inv_d, eps, scale_w,
                            GROUPED: tl.constexpr,
                            ROUND_LOGITS: tl.constexpr, RENORM: tl.constexpr, SIGMOID: tl.constexpr,
                            HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr, TOP2: tl.constexpr, EPP: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
                            PRECISE: tl.constexpr):
        """Program (row, c): s = h + a (rounded to h's dtype), x = RMSNorm(s) * nw as the fused norm computes it
        (each program the whole row itself, from L2: no sync), and the logits of experts [c EPP, +EPP) = x gw^T in
        fp32 (ROUND_LOGITS: rounded to x's dtype, as F.linear's output). Program (row, 0) writes s, x and x to the
        pinned hx; the row's last program to finish (a counter per row, reset by it) reads all logits and routes
        them into hids / hw: TopKRouter's softmax top-k, or (GROUPED) DeepSeek's MoEGate."""
        row, c = tl.program_id(0), tl.program_id(1)
        base = row.to(tl.int64) * D
        ty = hout_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)  # the whole row in registers: every load below is issued at once, none waits
        cm = cols < D  # for another (a loop over chunks took one memory round trip per chunk: 21 us at D 7168)
        sv = (tl.load(h_ptr + base + cols, mask=cm, other=0.0).to(tl.float32)
              + tl.load(a_ptr + base + cols, mask=cm, other=0.0).to(tl.float32)).to(ty)
        sf = sv.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(sf * sf, 0) * inv_d + eps)
        yn = (sf * inv_rms).to(ty).to(tl.float32)
        xv = (yn * tl.load(nw_ptr + cols, mask=cm, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        if c == 0:
            tl.store(hout_ptr + base + cols, sv, mask=cm)
            tl.store(x_ptr + base + cols, xv, mask=cm)
        ex = c * EPP + tl.arange(0, EPP)
        w = tl.load(gw_ptr + ex[:, None].to(tl.int64) * D + cols[None, :], mask=(ex[:, None] < E) & cm[None, :],
                    other=0.0)  # the program's EPP weight rows as one tile: one reduction, not EPP
        lg = tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, :], 1)
        if ROUND_LOGITS:
            lg = lg.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(logits_ptr + row.to(tl.int64) * E + ex, lg, mask=ex < E)
        tl.debug_barrier()  # every thread's logits stored before the counter says so (release at GPU scope)
        last = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu") == tl.num_programs(1) - 1
        if c == 0:  # after the counter: its fence would wait for these writes over PCIe
            tl.store(hx_ptr + base + cols, xv.to(hx_ptr.dtype.element_ty), mask=cm)
        if last:
            e = tl.arange(0, BLOCK_E)
            z = tl.load(logits_ptr + row.to(tl.int64) * E + e, mask=e < E, other=float("-inf"),
                        cache_modifier=".cg")  # other programs' stores, from L2
            if GROUPED:
                _route_grouped_z(z, e, bias_ptr, hids_ptr, hw_ptr, row, E, K, TOPK_GROUP, scale_w, SIGMOID,
                                 HAS_BIAS, GROUPS, TOP2, RENORM, BLOCK_E, BLOCK_K, PRECISE)
            else:
                _route_z(z, e, hids_ptr, hw_ptr, row, E, K, RENORM, BLOCK_E, BLOCK_K, PRECISE)
            tl.store(cnt_ptr + row, 0)  # ready for the next launch (stream order)


def _on(device: torch.device):
    """Triton launches on the current CUDA device (nothing to set for the interpreter's CPU tensors)."""
    return torch.cuda.device(device) if torch.device(device).type == "cuda" else nullcontext()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def stage_out(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, hx: torch.Tensor, hids: torch.Tensor,
              hw: torch.Tensor) -> None:
    """x [N, D], ids [N, K], weights [N, K] (device) -> the first N rows of the pinned hx, hids (int64), hw (fp32)."""
    n, d = x.shape
    k = ids.shape[1]
    x, ids, weights = _rows(x), _rows(ids), _rows(weights)
    grid = (n, triton.cdiv(d, BLOCK_D))
    with _on(x.device):
        _stage_out_kernel[grid](x, ids, weights, hx, hids, hw, d, k, x.stride(0), ids.stride(0), weights.stride(0),
                                ROUTE=False, RENORM=False, E=1, BLOCK_E=16, BLOCK_K=triton.next_power_of_2(k),
                                BLOCK=BLOCK_D, PRECISE=_PRECISE_EXP, num_warps=4)


def route_out(x: torch.Tensor, logits: torch.Tensor, top_k: int, renormalize: bool, hx: torch.Tensor,
              hids: torch.Tensor, hw: torch.Tensor) -> None:
    """TopKRouter's softmax / top-k / renormalize of `logits` [N, E] and x [N, D], written to the first N rows of
    the pinned hx, hids (int64), hw (fp32) in one launch."""
    n, d = x.shape
    e = logits.shape[1]
    if e > MAX_EXPERTS:
        raise ValueError(f"route_out: {e} experts exceed the fused router's {MAX_EXPERTS}")
    x, logits = _rows(x), _rows(logits)
    grid = (n, triton.cdiv(d, BLOCK_D))
    with _on(x.device):
        _stage_out_kernel[grid](x, logits, logits, hx, hids, hw, d, top_k, x.stride(0), logits.stride(0), 0,
                                ROUTE=True, RENORM=bool(renormalize), E=e, BLOCK_E=triton.next_power_of_2(e),
                                BLOCK_K=triton.next_power_of_2(top_k), BLOCK=BLOCK_D, PRECISE=_PRECISE_EXP,
                                num_warps=1)  # the top-k's K reductions in one warp: no cross-warp syncs


def stage_in(h: torch.Tensor, dtype: torch.dtype, device: torch.device, *adds: torch.Tensor | None) -> torch.Tensor:
    """The pinned h [N, D] read on `device` as `dtype`, plus each device tensor in `adds` (None skipped), in order."""
    a, b = (list(t for t in adds if t is not None) + [None, None])[:2]
    if len([t for t in adds if t is not None]) > 2:
        raise ValueError("stage_in adds at most two tensors")
    n, d = h.shape
    y = torch.empty(n, d, dtype=dtype, device=device)
    a = None if a is None else a.contiguous()
    b = None if b is None else b.contiguous()
    grid = (n, triton.cdiv(d, BLOCK_D))
    with _on(device):
        _stage_in_kernel[grid](h, a if a is not None else y, b if b is not None else y, y, d, HAS_A=a is not None,
                               HAS_B=b is not None, BLOCK=BLOCK_D, num_warps=4)
    return y


def grouped_router_supported(n_experts: int, n_group: int) -> bool:
    """Whether route_out_grouped takes this expert layout (a power-of-two count in equal power-of-two groups)."""
    return (0 < n_experts <= MAX_EXPERTS and n_experts & (n_experts - 1) == 0 and n_group >= 1
            and n_group & (n_group - 1) == 0 and n_experts % n_group == 0)


def route_out_grouped(x: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor | None, *, sigmoid: bool,
                      n_group: int, topk_group: int, top2: bool, top_k: int, renormalize: bool, scale: float,
                      hx: torch.Tensor, hids: torch.Tensor, hw: torch.Tensor) -> None:
    """DeepSeek's MoEGate (tandem.models.deepseek) from its fp32 logits [N, E]: scores (sigmoid or softmax), plus
    bias for the choice, the best `topk_group` of `n_group` groups (n_group 1: no grouping), the top-k of the
    choice weighted by their scores, renormalized (+1e-20) and scaled; x [N, D] -> hx; one launch."""
    n, d = x.shape
    e = logits.shape[1]
    if not grouped_router_supported(e, n_group):
        raise ValueError(f"route_out_grouped: {e} experts in {n_group} groups is not supported")
    x, logits = _rows(x), _rows(logits)
    grid = (n, triton.cdiv(d, BLOCK_D))
    with _on(x.device):
        _route_grouped_kernel[grid](x, logits, bias if bias is not None else logits, hx, hids, hw, d, e, top_k,
                                    topk_group, x.stride(0), logits.stride(0), float(scale), SIGMOID=bool(sigmoid),
                                    HAS_BIAS=bias is not None, GROUPS=n_group, TOP2=bool(top2),
                                    RENORM=bool(renormalize), BLOCK_E=e, BLOCK_K=triton.next_power_of_2(top_k),
                                    BLOCK=BLOCK_D, PRECISE=_PRECISE_EXP, num_warps=1)


@dataclass(frozen=True)
class Grouping:
    """DeepSeek's MoEGate after its logits (route_out_grouped's keywords)."""

    bias: torch.Tensor | None
    sigmoid: bool
    n_group: int
    topk_group: int
    top2: bool
    scale: float


def entry_counters(device: torch.device) -> torch.Tensor | None:
    """route_entry's per-row counters on `device` (zeros, made once, never inside a graph capture: None there)."""
    device = torch.device(device)
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[device] = torch.zeros(ENTRY_ROWS, dtype=torch.int32, device=device)
    return _counters[device]


def route_entry(h: torch.Tensor, a: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_weight: torch.Tensor,
                top_k: int, hx: torch.Tensor, hids: torch.Tensor, hw: torch.Tensor, *, renormalize: bool = True,
                grouping: Grouping | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A decoder layer's residual add, the norm before its MoE block and the block's router, in one launch:
    s = h + a, x = rms_norm(s) (tandem.gpu.fused.add_rms_norm's arithmetic), logits = x gate_weight^T, then
    route_out (TopKRouter) or, with `grouping`, route_out_grouped (MoEGate, fp32 logits) into the pinned hx, hids,
    hw. Returns (x, s, logits [N, E] fp32), or None where it does not apply (more than ENTRY_ROWS rows, rows wider
    than ENTRY_DIM, a capture before the first eager call made the counters); h, a [N, D] on one GPU."""
    n, d = h.shape
    e = gate_weight.shape[0]
    ok = grouped_router_supported(e, grouping.n_group) if grouping is not None else e <= MAX_EXPERTS
    if not ok or gate_weight.shape[1] != d or a.shape != h.shape or norm_weight.shape != (d,):
        raise ValueError(f"route_entry: h {tuple(h.shape)}, a {tuple(a.shape)}, norm {tuple(norm_weight.shape)}, "
                         f"gate {tuple(gate_weight.shape)}" + (f" in {grouping.n_group} groups" if grouping else ""))
    counters = entry_counters(h.device) if 0 < n <= ENTRY_ROWS and d <= ENTRY_DIM else None
    if counters is None:
        return None
    h, a, gate_weight = h.contiguous(), a.contiguous(), gate_weight.contiguous()
    s = torch.empty_like(h)
    x = torch.empty(n, d, dtype=torch.promote_types(h.dtype, norm_weight.dtype), device=h.device)
    logits = torch.empty(n, e, dtype=torch.float32, device=h.device)
    g = grouping or Grouping(None, False, 1, 1, False, 1.0)
    grid = (n, triton.cdiv(e, EXPERTS_PER_PROGRAM))
    block = triton.next_power_of_2(d)  # 8 warps at 2048, 16 at 8192: the [EPP, D] tile ~32-64 values per thread
    with _on(h.device):
        _route_entry_kernel[grid](h, a, norm_weight, gate_weight, g.bias if g.bias is not None else logits, s, x,
                                  logits, counters, hx, hids, hw, d, e, top_k, g.topk_group, 1.0 / d, eps,
                                  float(g.scale), GROUPED=grouping is not None, ROUND_LOGITS=grouping is None,
                                  RENORM=bool(renormalize), SIGMOID=g.sigmoid, HAS_BIAS=g.bias is not None,
                                  GROUPS=g.n_group, TOP2=g.top2, EPP=EXPERTS_PER_PROGRAM,
                                  BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
                                  BLOCK=block, PRECISE=_PRECISE_EXP, num_warps=max(4, min(16, block // 256)),
                                  enable_fp_fusion=False)
    return x, s, logits
