"""Fewer launches between two CPU expert calls: the residual add + RMSNorm kernel (tandem.gpu.fused.add_rms_norm),
q/k norm + RoPE writing the KV cache (fused.qk_norm_rope(cache=...)), the router entry (tandem.gpu.staging.
route_entry: add + norm + router GEMV + top-k in one launch), and the decoder stack run through them
(tandem.ops.residual) against the unfused path and the CPU reference. Fresh random inputs, never zeros.

Tolerances:
- sums (h + p + adds) are rounded one by one in the reference's order: bit-equal.
- norms: test_fused.py's bound (the normalized row within one step of its dtype, the output within 1.5 steps).
- the router's logits: the products are exact in fp32 (bf16 x bf16), only the order of the D-term sum differs
  from the fp32 reference: within 2^-14 of the sum of |x_i w_i| (a 2048-term fp32 sum is off by at most
  2048 * 2^-24 of it in the worst case, ~2^-13; in practice far less), plus one bf16 step where TopKRouter rounds
  them to x's dtype. The routing on the kernel's own logits runs route_out's code with other warps: the same ids
  (a draw whose probabilities tie within 1e-6 across the k-th place is exempt), weights within 4e-7 relative
  (the softmax's and the renormalization's sums in another order: a few fp32 ulps, as test_staging.py).
- a model decoded through the fused path: the same tokens as the unfused path and the CPU reference (float32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fused import check, norm_reference, step
from tiny import make_hf, save_hf

import tandem
from tandem.gpu import fused, staging
from tandem.models.layers import RotaryEmbedding
from tandem.ops import attention, residual
from tandem.ops.moe import kernel_dtype

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(fused.triton is None, reason="needs Triton")]
DEV = "cuda:0"


def norm_bound(y: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y_step = step(y, dtype) if dtype != torch.float32 else 0.0
    return w.float().abs() * (y_step + y.float().abs() * 2**-20) + 1.5 * step(ref, ref.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,d", [(1, 2048), (3, 7168), (5, 300)])
@pytest.mark.parametrize("host", [False, True])
def test_add_rms_norm_equals_the_adds_then_the_norm(dtype, n, d, host):
    g = torch.Generator(device=DEV).manual_seed(n * d)
    h, a, b = (torch.randn(n, d, device=DEV, generator=g).to(dtype) * 2 for _ in range(3))
    w = (torch.rand(d, device=DEV, generator=g) + 0.5).to(dtype)
    pdt = torch.float32 if dtype != torch.bfloat16 else dtype  # the CPU experts' pinned dtype (kernel_dtype)
    p = torch.randn(n, d, device=DEV, generator=g).to(pdt)
    if host:
        p = p.cpu().pin_memory()
    for adds in ((), (a,), (a, b)):
        out, s = fused.add_rms_norm(h, p, w, 1e-6, *adds, p_host=host)
        y = p.to(DEV).to(dtype)
        for t in adds:
            y = y + t
        ref_s = h + y
        assert torch.equal(s, ref_s)
        ref, yn = norm_reference(ref_s, w, 1e-6)
        check(out, ref, norm_bound(yn, ref, w, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,hq,hk,d", [(1, 32, 4, 128), (3, 8, 2, 64), (8, 16, 16, 128)])
def test_qk_norm_rope_writes_the_cache(dtype, n, hq, hk, d):
    """k's rotated rows and v land at their slots as write_kv puts them, bit-equal to qk_norm_rope's own outputs
    (test_fused.py checks those against the reference layers); every other cache row is left as it was."""
    torch.manual_seed(n + hq + d)
    y = torch.randn(n, (hq + 2 * hk) * d, device=DEV).to(dtype)  # one q/k/v projection: strided views
    q, k = y[:, : hq * d].view(n, hq, d), y[:, hq * d : (hq + hk) * d].view(n, hk, d)
    v = y[:, (hq + hk) * d :].view(n, hk, d)
    wq, wk = ((torch.rand(d, device=DEV) + 0.5).to(dtype) for _ in range(2))
    rope = RotaryEmbedding(d, {"rope_type": "default", "rope_theta": 1e6}, 4096).to(DEV)
    pos = torch.randint(0, 4000, (n,), device=DEV)
    slots = torch.randperm(256, device=DEV)[:n]
    kc, vc = (torch.randn(256, hk, d, device=DEV).to(dtype) for _ in range(2))
    kc0, vc0 = kc.clone(), vc.clone()
    args = (wq, wk, 1e-6, pos, rope.inv_freq, rope.scale, False)
    oq, ok = fused.qk_norm_rope(q, k, *args)
    oq2, none = fused.qk_norm_rope(q, k, *args, cache=(v, kc, vc, slots))
    assert none is None and torch.equal(oq2, oq)
    assert torch.equal(kc[slots], ok) and torch.equal(vc[slots], v)
    rest = torch.ones(256, dtype=torch.bool, device=DEV)
    rest[slots] = False
    assert torch.equal(kc[rest], kc0[rest]) and torch.equal(vc[rest], vc0[rest])


def pinned(*shape, dtype):
    return torch.full(shape, 7, dtype=dtype).pin_memory()


def host_buffers(rows: int, d: int, k: int, dtype: torch.dtype):
    """Pinned hx [rows, d], hids [rows, k], hw [rows, k], filled with 7 (a row left unwritten shows)."""
    return pinned(rows, d, dtype=dtype), pinned(rows, k, dtype=torch.long), pinned(rows, k, dtype=torch.float32)


def entry_inputs(n: int, d: int, e: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    h, a = (torch.randn(n, d, device=DEV, generator=g).to(dtype) for _ in range(2))
    nw = (torch.rand(d, device=DEV, generator=g) + 0.5).to(dtype)
    gw = (torch.randn(e, d, device=DEV, generator=g) * 0.05).to(dtype)
    return h, a, nw, gw


def check_entry_front(h, a, nw, x, s, logits, gw, rounded: bool) -> None:
    """s bit-equal to h + a, x the norm of it, logits the router's GEMM of x (see the module docstring)."""
    assert torch.equal(s, h + a)
    ref, yn = norm_reference(s, nw, 1e-6)
    check(x, ref, norm_bound(yn, ref, nw, x.dtype))
    want = F.linear(x.float(), gw.float())
    bound = 2**-14 * F.linear(x.float().abs(), gw.float().abs()) + (step(want, x.dtype) if rounded else 0.0)
    assert ((logits - want).abs() <= bound).all(), (logits - want).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("e,k,d", [(128, 8, 2048), (64, 6, 1000), (8, 2, 256)])
@pytest.mark.parametrize("n", [1, 3, 16])
def test_route_entry_topk(dtype, e, k, d, n):
    h, a, nw, gw = entry_inputs(n, d, e, dtype, e * n + d)
    kd = kernel_dtype(dtype)
    hx, hi, hw = host_buffers(16, d, k, kd)
    for _ in range(2):  # the counters reset themselves: a second launch routes again
        hi.fill_(-1)
        x, s, logits = staging.route_entry(h, a, nw, 1e-6, gw, k, hx, hi, hw, renormalize=True)
        torch.cuda.synchronize()
        assert (hi[:n] >= 0).all()
    check_entry_front(h, a, nw, x, s, logits, gw, rounded=dtype != torch.float32)
    assert torch.equal(hx[:n], x.to(kd).cpu()) and (hx[n:] == 7).all()
    hx2, hi2, hw2 = host_buffers(16, d, k, kd)
    staging.route_out(x, logits, k, True, hx2, hi2, hw2)  # route_out's code on the same logits
    torch.cuda.synchronize()
    probs = logits.softmax(-1).sort(-1, descending=True).values.cpu()
    tie = probs[:, k - 1] - probs[:, k] < 1e-6
    same = (hi[:n] == hi2[:n]).all(1)
    assert (same | tie).all()
    torch.testing.assert_close(hw[:n][same], hw2[:n][same], rtol=4e-7, atol=0)


@pytest.mark.parametrize("method", ["noaux_tc", "greedy", "group_limited"])
@pytest.mark.parametrize("n", [1, 7])
def test_route_entry_grouped(method, n):
    from test_staging import random_gate

    from tandem.ops.moe import grouping_of

    gate, a_ = random_gate(method, n + len(method))
    d, k = 512, a_.num_experts_per_tok
    h, a, nw, _ = entry_inputs(n, d, 8, torch.bfloat16, n * 31)
    hx, hi, hw = host_buffers(16, d, k, torch.bfloat16)
    g = grouping_of(gate)
    normalize = a_.norm_topk_prob and k > 1
    x, s, logits = staging.route_entry(h, a, nw, 1e-6, gate.weight, k, hx, hi, hw, renormalize=normalize, grouping=g)
    torch.cuda.synchronize()
    check_entry_front(h, a, nw, x, s, logits, gate.weight, rounded=False)
    hx2, hi2, hw2 = host_buffers(16, d, k, torch.bfloat16)
    staging.route_out_grouped(x, logits, g.bias, sigmoid=g.sigmoid, n_group=g.n_group, topk_group=g.topk_group,
                              top2=g.top2, top_k=k, renormalize=normalize, scale=g.scale, hx=hx2, hids=hi2, hw=hw2)
    torch.cuda.synchronize()
    assert torch.equal(hi[:n], hi2[:n]) and torch.equal(hx[:n], hx2[:n])
    torch.testing.assert_close(hw[:n], hw2[:n], rtol=4e-7, atol=0)


def test_route_entry_in_a_cuda_graph():
    n, d, e, k = 2, 1024, 128, 8
    h, a, nw, gw = entry_inputs(n, d, e, torch.bfloat16, 5)
    hx, hi, hw = host_buffers(n, d, k, torch.bfloat16)
    staging.route_entry(h, a, nw, 1e-6, gw, k, hx, hi, hw)  # compiles, makes the counters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x, s, logits = staging.route_entry(h, a, nw, 1e-6, gw, k, hx, hi, hw)
    for seed in range(3):
        h2, a2, _, _ = entry_inputs(n, d, e, torch.bfloat16, 100 + seed)
        h.copy_(h2)
        a.copy_(a2)
        hi.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(s, h + a)
        hx2, hi2, hw2 = (torch.empty_like(t).pin_memory() for t in (hx, hi, hw))
        staging.route_out(x, logits, k, True, hx2, hi2, hw2)
        torch.cuda.synchronize()
        assert torch.equal(hi, hi2) and torch.equal(hx, x.cpu())
        torch.testing.assert_close(hw, hw2, rtol=4e-7, atol=0)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "qwen2_moe"])
def test_fused_layers_decode_as_unfused_and_cpu(name, tmp_path, monkeypatch):
    """The family's 1gpu preset (hybrid MoE blocks), graphed decode: the fused residual path (add + norm, the
    router entry, the KV write in the RoPE launch) against the same model with the three switched off, and the
    CPU reference: same tokens; the graphed step's logits equal within float32 sum-order noise."""
    from test_graph_decode import NEW, PROMPTS, run

    path = save_hf(make_hf(name), tmp_path)
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    want = [cpu.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(PROMPTS, NEW)]
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(residual, "ENABLED", on)
        monkeypatch.setattr(staging, "ENTRY", on)
        monkeypatch.setattr(attention, "FUSED_KV", on)
        llm = tandem.load(path, rules="1gpu", dtype="float32", progress=False)
        outs[on], engine = run(llm, graphs=True)
        assert engine.graphs.disabled is None and engine.graphs.replays > 0, engine.graphs.disabled
    assert outs[True] == outs[False] == want
