"""The decode GEMV (tandem.gpu.gemv) against a float64 reference on the weight's exact values, every format and
tiling it takes, and its place in quant_linear (a decode step's linears) inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from gpu_ref import rel_err

pytest.importorskip("triton")  # the kernels' module imports it: CPU-only installs skip the whole file
from tandem.gpu import blocks as B  # noqa: E402
from tandem.gpu import gemv as G  # noqa: E402
from tandem.gpu.quant_matmul import quant_linear  # noqa: E402

pytestmark = pytest.mark.gpu
# one output rounding (bf16 / fp16: 2^-9 / 2^-12 relative per element) over fp32 sums of up to 16 K terms
TOL = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 2e-5}


def _weight(fmt: str, n: int, k: int, seed: int) -> B.QuantTensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    if fmt in G.FLOAT:
        return B.QuantTensor(fmt, w.to(B.FLOAT_FORMATS[fmt]), (n, k))
    if fmt == B.FP8:  # magnitudes over 8 decades: values on E4M3 subnormals in most blocks
        return B.from_float(w * torch.exp(torch.empty_like(w).uniform_(-9, 0, generator=g)), B.FP8)
    return B.q8_0_planar(B.from_float(w, "q8_0"))


def _reference(x: torch.Tensor, w: B.QuantTensor) -> torch.Tensor:
    return x.double() @ w.dequantize().double().T


def _replays_in_a_graph(fn, x: torch.Tensor, *args) -> None:
    """fn(x, *args) captured in a CUDA graph and replayed on a new x equals the eager call."""
    graph, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            captured = fn(x, *args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, fn(x, *args))


CASES = [("bf16", 1), ("fp16", 1), ("fp32", 1)] + [("q8_0p", m) for m in (1, 2, 3, 4)]  # (format, rows)
SHAPES = [(7, 128), (577, 7168), (1536, 1024), (300, 4032)]  # q8_0p rows: whole 4-byte words (K % 64 == 0)


@pytest.mark.parametrize("fmt,m,n,k", [(f, m, n, k) for f, m in CASES for n, k in SHAPES + [(5, 100)]
                                        if f != "q8_0p" or k % 64 == 0])
def test_gemv_equals_the_float64_product(fmt, m, n, k):
    dtype = torch.float32 if fmt == "fp32" else torch.float16 if fmt == "fp16" else torch.bfloat16
    w = _weight(fmt, n, k, seed=n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = G.gemv(x, w)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out.double(), _reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("fmt,m", [("bf16", 1), ("q8_0p", 3)])
@pytest.mark.parametrize("config", [G.Config(1, 256, 4), G.Config(4, 1024, 8), G.Config(16, 512, 4),
                                    G.Config(2, 128, 4), G.Config(4, 1024, 8, prmt=False)])
def test_every_tiling_gives_the_same_product(fmt, m, config):
    """The benchmark sweeps tilings; each must compute the same product (masks on N, K and rows)."""
    w = _weight(fmt, 333, 2112, seed=1)
    x = torch.randn(m, 2112, device="cuda", dtype=torch.bfloat16)
    assert rel_err(G.gemv(x, w, config=config).double(), _reference(x, w)) < TOL[torch.bfloat16]


def test_quant_linear_takes_the_gemv_for_few_rows_inside_a_graph():
    w = _weight("q8_0p", 1024, 2048, seed=2)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    eager = quant_linear(x, w, bias)
    many = quant_linear(x.expand(8, -1).contiguous(), w, bias)  # 8 rows: the tensor-core kernel
    assert rel_err(eager.double(), _reference(x, w) + bias.double()) < TOL[torch.bfloat16]
    assert rel_err(many[:1].double(), eager.double()) < TOL[torch.bfloat16]
    _replays_in_a_graph(quant_linear, x, w, bias)


def test_gemv_refuses_what_it_does_not_take_and_quant_linear_falls_back():
    w = _weight("bf16", 8, 64, seed=3)
    with pytest.raises(ValueError, match="at most 1 rows"):
        G.gemv(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="takes 64"):
        G.gemv(torch.randn(1, 32, device="cuda", dtype=torch.bfloat16), w)
    odd = _weight("q8_0p", 40, 96, seed=4)  # rows of 102 bytes: not whole words
    x = torch.randn(1, 96, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="K % 64"):
        G.gemv(x, odd)
    assert rel_err(quant_linear(x, odd).double(), _reference(x, odd)) < TOL[torch.bfloat16]


FP8_CASES = [(m, n, k) for m in (1, 2, 3, 4, 8) for n, k in [(7, 128), (577, 7168), (1536, 1024), (300, 4096)]]


@pytest.mark.parametrize("m,n,k", FP8_CASES)
def test_fp8_gemv_equals_the_float64_product(m, n, k):
    w = _weight(B.FP8, n, k, seed=n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert rel_err(G.gemv(x, w).double(), _reference(x, w)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("config", [G.Config(16, 256, 4), G.Config(4, 128, 2), G.Config(32, 512, 8),
                                    G.Config(8, 512, 4, prmt=False), G.Config(1, 2048, 8, prmt=False)])
def test_every_fp8_tiling_and_conversion_gives_the_same_product(config):
    """Both conversions (integer ops with the 2^60 scaling, Triton's), every tiling, masks on N, K and rows."""
    w = _weight(B.FP8, 333, 2176, seed=5)
    for m in (1, 5):
        x = torch.randn(m, 2176, device="cuda", dtype=torch.bfloat16)
        assert rel_err(G.gemv(x, w, config=config).double(), _reference(x, w)) < TOL[torch.bfloat16]
    # small fp32 activations: the integer conversion's products (x 2^60 times w 2^-120) stay normal down to
    # |x w| ~ 2^-66 (1e-20); here |x w| reaches 1e-10 * 1e-2 * 2^-9 (the smallest subnormal weights)
    small = torch.randn(1, 2176, device="cuda", dtype=torch.float32) * 1e-10
    assert rel_err(G.gemv(small, w, config=config).double(), _reference(small, w)) < 1e-5


@pytest.mark.parametrize("m", [1, 8, 12, 40])
def test_fp8_linear_every_row_count_inside_a_graph(m):
    """linear.fp8: the GEMV (<= 8 rows), the tensor-core quant matmul (<= 16), a dequantized weight and cuBLAS."""
    from tandem.ops.linear import fp8_linear

    w = _weight(B.FP8, 640, 1536, seed=m)
    bias = torch.randn(640, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, 1536, device="cuda", dtype=torch.bfloat16)
    eager = fp8_linear(x, w, bias)
    assert rel_err(eager.double(), _reference(x, w) + bias.double()) < TOL[torch.bfloat16]
    _replays_in_a_graph(fp8_linear, x, w, bias)


def test_fp8_dequantize_on_the_gpu_equals_the_reference():
    from tandem.gpu.dequant import dequantize_into

    w = _weight(B.FP8, 300, 1024, seed=6)
    out = dequantize_into(w, torch.empty(300, 1024, device="cuda"))
    assert torch.equal(out, w.dequantize())
