"""Fused RMSNorm and RoPE (tandem.gpu.fused) against the torch reference layers on the same GPU, fresh random
inputs, every float dtype, odd sizes, strided rows; inside CUDA-graph capture; and the norm / rope operators on a
GPU running them.

Tolerances, from the arithmetic (both sides run the same fp32 steps; the kernels differ only in the order of the
norm's sum of squares and possibly in the last bits of rsqrt / cos / sin):
- norm: the normalized row y differs by at most 2^-20 |y| in fp32 (a few fp32 ulps of sum order and rsqrt), so
  after its rounding to x's dtype by at most one step of that dtype (bf16/fp16) or those 2^-20; times the weight,
  the final rounding to the output dtype adds at most half a step at each of the two values (1.5 steps of the
  reference's, should they straddle a power of two).
- rope: each output is a two-term fp32 sum, off by at most 2^-21 of the terms' magnitudes (a few ulps of cos/sin
  and of the products), plus the output rounding as above.
With bf16 / fp16 outputs, those fp32 differences flip a rounding in well under 1% of the values: at least 99%
must be bit-equal to the reference (the same computation, not merely a close one).
"""

from __future__ import annotations

import pytest
import torch

from tandem.gpu import fused, joined
from tandem.models.layers import RMSNorm, RotaryEmbedding
from tandem.ops.base import LoadContext, OpConfig, build_device_op
from tandem.ops.norm import NormOp
from tandem.ops.rope import RoPEOp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(fused.triton is None, reason="needs Triton")]
DEV = "cuda:0"
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "mscale": 1.0, "mscale_all_dim": 0.0}  # an attention scale of YaRN != 1 (0.1 ln 40 + 1)


def step(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One rounding step (ulp) of `dtype` at |v|, as float32."""
    _, e = torch.frexp(v.float().abs())
    return torch.exp2((torch.clamp(e - 1, min=MIN_EXP[dtype]) - MANTISSA[dtype]).float())


def check(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error over the bound by {worst:.3g} (max error {err.max().item():.3g})"
    if out.dtype != torch.float32:
        assert (out == ref).float().mean().item() >= 0.99


def norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the RMSNorm layer's output, its normalized row y in x's dtype)."""
    layer = RMSNorm(x.shape[-1], eps).to(DEV)
    layer.weight.data = w
    xf = x.float()
    return layer(x), (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(1, 2048), (7, 7168), (5, 32, 128), (3, 4, 100), (9, 513), (2, 3, 1),
                                   (300, 2048)])
def test_rms_norm_matches_the_layer(x_dtype, w_dtype, shape):
    torch.manual_seed(sum(shape) + MANTISSA[x_dtype] + MANTISSA[w_dtype])
    x = (torch.randn(shape, device=DEV) * 3).to(x_dtype)
    w = (torch.rand(shape[-1], device=DEV) + 0.5).to(w_dtype)
    out = fused.rms_norm(x, w, 1e-6)
    ref, y = norm_reference(x, w, 1e-6)
    y_step = step(y, x_dtype) if x_dtype != torch.float32 else 0.0
    bound = w.float().abs() * (y_step + y.float().abs() * 2**-20) + 1.5 * step(ref, ref.dtype)
    check(out, ref, bound)
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_of_strided_rows(dtype):
    """MLA's latent: the first r columns of a [N, r + rope] projection; Qwen3's q/k heads of a [N, H*d] view."""
    torch.manual_seed(3)
    kv = torch.randn(11, 512 + 64, device=DEV).to(dtype)
    latent = kv[:, :512]
    q = torch.randn(6, 4, 192, device=DEV).to(dtype)[..., :128]
    for x in (latent, q):
        w = (torch.rand(x.shape[-1], device=DEV) + 0.5).to(dtype)
        ref, y = norm_reference(x, w, 1e-6)
        y_step = step(y, dtype) if dtype != torch.float32 else 0.0
        check(fused.rms_norm(x, w, 1e-6), ref, w.float().abs() * (y_step + y.float().abs() * 2**-20)
              + 1.5 * step(ref, dtype))


def rope_case(d: int, params: dict, interleaved: bool, x: torch.Tensor, pos: torch.Tensor) -> None:
    layer = RotaryEmbedding(d, params, 163840, interleaved).to(DEV)
    out = fused.rope(x, pos, layer.inv_freq, layer.scale, interleaved)
    ref = layer(x, pos)
    freqs = pos.float()[:, None] * layer.inv_freq  # magnitudes of the two products of each output
    cos, sin = (freqs.cos() * layer.scale)[:, None, :].abs(), (freqs.sin() * layer.scale)[:, None, :].abs()
    xf = x.float().abs()
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)
    mag = x1 * cos + x2 * sin
    mag = torch.stack((mag, x2 * cos + x1 * sin), -1).flatten(-2) if interleaved else torch.cat(
        (mag, x2 * cos + x1 * sin), -1)
    bound = mag * 2**-21 + (1.5 * step(ref, x.dtype) if x.dtype != torch.float32 else 0.0)
    check(out, ref, bound)
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("params", [{"rope_type": "default", "rope_theta": 1000000.0}, YARN], ids=["plain", "yarn"])
@pytest.mark.parametrize("n,h,d", [(1, 32, 128), (37, 4, 128), (5, 16, 64), (3, 2, 6), (260, 8, 96)])
def test_rope_matches_the_layer(dtype, interleaved, params, n, h, d):
    torch.manual_seed(n * 1000 + h * 10 + d)
    x = torch.randn(n, h, d, device=DEV).to(dtype)
    pos = torch.randint(0, 163840, (n,), device=DEV)
    pos[0] = 0
    rope_case(d, params, interleaved, x, pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_of_mla_slices(dtype):
    """DeepSeek: q_pe = the last 64 of each head's 192, k_pe = the last 64 of a [N, 512 + 64] row, interleaved."""
    torch.manual_seed(4)
    n, h = 9, 16
    pos = torch.arange(100, 100 + n, device=DEV)
    q_pe = torch.randn(n, h, 192, device=DEV).to(dtype)[..., 128:]
    k_pe = torch.randn(n, 512 + 64, device=DEV).to(dtype)[:, 512:][:, None, :]
    for x in (q_pe, k_pe):
        rope_case(64, YARN, True, x, pos)


def test_fused_kernels_replay_in_a_cuda_graph():
    """Captured once, replayed on new inputs: the same values as eager launches (no host sync, no stale state)."""
    torch.manual_seed(5)
    x = torch.randn(8, 2048, device=DEV, dtype=torch.bfloat16)
    w = torch.rand(2048, device=DEV, dtype=torch.bfloat16) + 0.5
    q = torch.randn(8, 32, 128, device=DEV, dtype=torch.bfloat16)
    pos = torch.randint(0, 4096, (8,), device=DEV)
    inv = RotaryEmbedding(128, {"rope_type": "default", "rope_theta": 1e6}, 40960).inv_freq.to(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels before capture
        fused.rms_norm(x, w, 1e-6), fused.rope(q, pos, inv, 1.0, False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed, rotated = fused.rms_norm(x, w, 1e-6), fused.rope(q, pos, inv, 1.0, False)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        q.copy_(torch.randn_like(q))
        pos.copy_(torch.randint(0, 40000, (8,), device=DEV))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(normed, fused.rms_norm(x, w, 1e-6))
        assert torch.equal(rotated, fused.rope(q, pos, inv, 1.0, False))


@pytest.mark.skipif(not fused.ENABLED, reason="TANDEM_FUSED=0")
def test_default_norm_and_rope_on_a_gpu_run_the_fused_kernels():
    cfg = OpConfig("model.layers.0.self_attn.q_norm", "default", DEV, DEV, DEV)
    ctx = LoadContext(None, torch.bfloat16)
    norm = build_device_op(RMSNorm(128, 1e-6).to(DEV, torch.bfloat16), cfg, ctx)
    rope = build_device_op(RotaryEmbedding(128, YARN, 163840, True).to(DEV), cfg, ctx)
    assert isinstance(norm, NormOp) and isinstance(rope, RoPEOp)
    torch.manual_seed(6)
    x = torch.randn(4, 8, 128, device=DEV, dtype=torch.bfloat16)
    pos = torch.tensor([0, 5, 4097, 70000], device=DEV)
    assert torch.equal(norm(x), fused.rms_norm(x, norm.weight, 1e-6))
    assert torch.equal(rope(x, pos), fused.rope(x, pos, rope.inv_freq, rope.scale, True))
    assert rope.scale != 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("n,hq,hk,d", [(1, 32, 4, 128), (37, 16, 2, 64), (5, 8, 8, 96)])
def test_qk_norm_rope_is_norm_then_rope(dtype, interleaved, norm, n, hq, hk, d):
    """One launch for both heads' norms and rotations, on strided views of one projection, equals the two fused
    kernels one after the other: bit-equal but for the norm's sum order (two half sums: the rms_norm tolerance)."""
    torch.manual_seed(n * 100 + hq + d)
    y = torch.randn(n, (hq + 2 * hk) * d, device=DEV).to(dtype)
    q, k = y[:, : hq * d].view(n, hq, d), y[:, hq * d : (hq + hk) * d].view(n, hk, d)
    wq, wk = (torch.rand(d, device=DEV).add(0.5).to(dtype) for _ in range(2))
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device=DEV).float() / d)
    pos = torch.randint(0, 40000, (n,), device=DEV)
    oq, ok = fused.qk_norm_rope(q, k, wq if norm else None, wk if norm else None, 1e-6, pos, inv, 1.0, interleaved)
    for out, x, w in ((oq, q, wq), (ok, k, wk)):
        normed = fused.rms_norm(x, w, 1e-6) if norm else x
        ref = fused.rope(normed, pos, inv, 1.0, interleaved)
        if not norm:
            assert torch.equal(out, ref)
            continue
        # a normed value one step off (sum order) moves both rotated values of its pair by up to one step of the
        # head's largest normed value, then the output rounds: 2 steps of that plus 1.5 of the output's own
        head_max = normed.float().abs().amax(-1, keepdim=True)
        bound = (2 * step(head_max, dtype) + 1.5 * step(ref, dtype) if dtype != torch.float32
                 else head_max * 2**-19)
        check(out, ref, bound)


@pytest.mark.skipif(not fused.ENABLED, reason="TANDEM_FUSED=0")
@pytest.mark.parametrize("qk_norm,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("n", [6, 1])
def test_gqa_kernels_match_the_module(qk_norm, bias, n, monkeypatch):
    """A GQA module on the GPU with q/k/v joined into one projection (one row: the bf16 GEMV, tandem.gpu.joined)
    and the q/k norm + rope launch equals its own forward (three GEMMs, separate norm and rope) within a few bf16
    steps (one GEMM's or the GEMV's rows are summed in another order), and the projections keep views of the
    joined weight (no second copy)."""
    from tandem.gpu import gemv
    from tandem.models.attention import Attention, Batch
    from tandem.ops.attention import GQAKernels

    calls = []
    run = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **k: calls.append(1) or run(*a, **k))
    monkeypatch.setattr(joined, "GEMV_MAX_N_PER_K", float("inf"))  # q ‖ k ‖ v: N = 768 > K = 512
    torch.manual_seed(11)
    rope = RotaryEmbedding(64, {"rope_type": "default", "rope_theta": 1000000.0}, 4096)
    attn = Attention(0, 512, 8, 2, 64, rope, qkv_bias=bias, qk_norm_eps=1e-6 if qk_norm else None)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.05)
    attn = attn.to(DEV, torch.bfloat16)
    x = torch.randn(n, 512, device=DEV, dtype=torch.bfloat16)
    batch = Batch.single(n)
    pos = batch.positions(DEV)
    with torch.no_grad():
        ref = attn(x, pos, batch)
        attn.__class__ = type("GQA", (GQAKernels, Attention), {})
        out = attn(x, pos, batch)
    w = attn._qkv.weight
    assert attn.q_proj.weight.data_ptr() == w.data_ptr() and attn.v_proj.weight.untyped_storage().data_ptr() == (
        w.untyped_storage().data_ptr())
    assert bool(calls) == (n == 1 and joined.GEMV)
    torch.testing.assert_close(out, ref, rtol=0.03, atol=0.03 * ref.abs().max().item())
    assert (out == ref).float().mean().item() > 0.5
