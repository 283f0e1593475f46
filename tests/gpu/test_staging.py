"""The hybrid MoE hand-off kernels (tandem.gpu.staging) against the torch path they replace, on fresh random inputs,
into and out of pinned host memory, eagerly and inside CUDA-graph capture.

Tolerances: stage_out / stage_in move values (and cast them as torch's .to() does) and add in the reference's order
with one rounding per add, so they are bit-equal. route_out's softmax runs the reference's fp32 steps (max, exp,
sum, divide) with libdevice's expf; only the sum's order differs, so probabilities differ by a few fp32 ulps: the
ids must be the same set (bf16 logits often tie inside the top k, where torch.topk's order is unspecified; a draw
with probabilities within 1e-6 across the top-k boundary is skipped) and the weights within 4e-7 relative (~3
ulps).
"""

from __future__ import annotations

import pytest
import torch

from tandem.gpu import staging
from tandem.models.transformer import TopKRouter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(staging.triton is None, reason="needs Triton")]
DEV = "cuda:0"


def pinned(*shape, dtype):
    return torch.full(shape, 7, dtype=dtype).pin_memory()  # nonzero: a row the kernel skips would show


@pytest.mark.parametrize("dtype,kdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                          (torch.float32, torch.float32)])
@pytest.mark.parametrize("n,d,k", [(1, 2048, 8), (3, 7168, 8), (5, 300, 6)])
def test_stage_out_and_in_equal_copies(dtype, kdtype, n, d, k):
    g = torch.Generator(device=DEV).manual_seed(n * d + k)
    x = torch.randn(n, d, device=DEV, generator=g).to(dtype)
    ids = torch.randint(0, 64, (n, k), device=DEV, generator=g)
    w = torch.rand(n, k, device=DEV, generator=g).to(dtype)
    hx, hi, hw = pinned(8, d, dtype=kdtype), pinned(8, k, dtype=torch.long), pinned(8, k, dtype=torch.float32)
    staging.stage_out(x, ids, w, hx, hi, hw)
    torch.cuda.synchronize()
    assert torch.equal(hx[:n], x.to(kdtype).cpu()) and torch.equal(hi[:n], ids.cpu())
    assert torch.equal(hw[:n], w.float().cpu())
    assert (hx[n:] == 7).all()  # rows past N untouched

    out = torch.randn(8, d, generator=torch.Generator().manual_seed(d)).to(kdtype).pin_memory()
    a = torch.randn(n, d, device=DEV, generator=g).to(dtype)
    b = torch.randn(n, d, device=DEV, generator=g).to(dtype)
    ref = out[:n].to(DEV).to(dtype)
    assert torch.equal(staging.stage_in(out[:n], dtype, x.device), ref)
    assert torch.equal(staging.stage_in(out[:n], dtype, x.device, None, b), ref + b)
    assert torch.equal(staging.stage_in(out[:n], dtype, x.device, a, b), ref + a + b)


@pytest.mark.parametrize("e,k,renorm", [(128, 8, True), (64, 6, False), (8, 2, True), (256, 10, True)])
@pytest.mark.parametrize("n", [1, 4, 33])
def test_route_out_matches_topk_router(e, k, renorm, n):
    d = 512
    torch.manual_seed(e * 100 + n)
    router = TopKRouter(d, e, k, renorm).to(DEV, torch.bfloat16)
    torch.nn.init.normal_(router.weight, std=0.05)
    x = torch.randn(n, d, device=DEV, dtype=torch.bfloat16)
    ids, w = router(x)
    probs = torch.nn.functional.linear(x, router.weight).float().softmax(-1).sort(-1, descending=True).values
    gap = (probs[:, k - 1] - probs[:, k]).min().item() if k < e else 1.0
    if gap < 1e-6:
        pytest.skip("a tie at the top-k boundary in this draw")
    hx, hi = pinned(64, d, dtype=torch.bfloat16), pinned(64, k, dtype=torch.long)
    hw = pinned(64, k, dtype=torch.float32)
    logits = torch.nn.functional.linear(x, router.weight)
    staging.route_out(x, logits, k, renorm, hx, hi, hw)
    torch.cuda.synchronize()
    # bf16 logits tie often inside the top k, where torch.topk's order is unspecified: compare (id, weight) sets
    got, want = hi[:n].sort(-1), ids.cpu().sort(-1)
    assert torch.equal(got.values, want.values)
    torch.testing.assert_close(hw[:n].gather(1, got.indices), w.cpu().gather(1, want.indices), rtol=4e-7, atol=0)
    assert torch.equal(hx[:n], x.cpu())


def test_route_and_stage_in_a_cuda_graph():
    d, e, k, n = 1024, 128, 8, 2
    torch.manual_seed(0)
    router = TopKRouter(d, e, k, True).to(DEV, torch.bfloat16)
    torch.nn.init.normal_(router.weight, std=0.05)
    x = torch.randn(n, d, device=DEV, dtype=torch.bfloat16)
    hx, hi, hw = pinned(n, d, dtype=torch.bfloat16), pinned(n, k, dtype=torch.long), pinned(n, k, dtype=torch.float32)
    out = torch.randn(n, d).to(torch.bfloat16).pin_memory()

    def step():
        staging.route_out(x, torch.nn.functional.linear(x, router.weight), k, True, hx, hi, hw)
        return staging.stage_in(out, torch.bfloat16, x.device, x)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    x.copy_(torch.randn(n, d, device=DEV, dtype=torch.bfloat16))  # new inputs after capture
    out.copy_(torch.randn(n, d).to(torch.bfloat16))
    hi.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    ids, _ = router(x)
    assert torch.equal(hi.sort(-1).values, ids.cpu().sort(-1).values) and torch.equal(hx, x.cpu())
    assert torch.equal(y, out.to(DEV) + x)
