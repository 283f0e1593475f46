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
    """The same top-k as TopKRouter where its choice is unique; where bf16 logits tie across the k-th place either
    choice is right, so every row is checked for being a top k of the probabilities (no chosen one below an unchosen
    one) with the weights of the ids it chose."""
    d = 512
    torch.manual_seed(e * 100 + n)
    router = TopKRouter(d, e, k, renorm).to(DEV, torch.bfloat16)
    torch.nn.init.normal_(router.weight, std=0.05)
    x = torch.randn(n, d, device=DEV, dtype=torch.bfloat16)
    ids, w = router(x)
    hx, hi = pinned(64, d, dtype=torch.bfloat16), pinned(64, k, dtype=torch.long)
    hw = pinned(64, k, dtype=torch.float32)
    logits = torch.nn.functional.linear(x, router.weight)
    staging.route_out(x, logits, k, renorm, hx, hi, hw)
    torch.cuda.synchronize()
    probs = logits.float().softmax(-1).cpu()
    chosen = probs.gather(1, hi[:n])
    unchosen = probs.scatter(1, hi[:n], -1.0).amax(1)
    assert (hi[:n].sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts
    assert (chosen.amin(1) >= unchosen - 1e-7).all()
    want = chosen / chosen.sum(1, keepdim=True) if renorm else chosen
    torch.testing.assert_close(hw[:n], want, rtol=4e-7, atol=0)
    # bf16 logits tie often inside the top k, where torch.topk's order is unspecified: compare (id, weight) sets
    unique = torch.tensor([len(set(a.tolist()) ^ set(b.tolist())) == 0 for a, b in zip(hi[:n], ids.cpu())])
    sorted_probs = probs.sort(-1, descending=True).values
    tie = (sorted_probs[:, k - 1] - sorted_probs[:, k] < 1e-6) if k < e else torch.zeros(n, dtype=torch.bool)
    assert (unique | tie).all()  # the router's own choice wherever it is the only one
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


BASE = dict(vocab_size=100, hidden_size=512, num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32,
            qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, moe_intermediate_size=32, intermediate_size=64)
GATES = {  # DeepSeek-V3's noaux_tc (sigmoid, bias, 8 groups keep 4), V2-Lite's greedy softmax, V2's grouped
    "noaux_tc": dict(model_type="deepseek_v3", n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8,
                     norm_topk_prob=True, routed_scaling_factor=2.5),
    "greedy": dict(model_type="deepseek_v2", n_routed_experts=64, topk_method="greedy", num_experts_per_tok=6,
                   routed_scaling_factor=1.0),
    "group_limited": dict(model_type="deepseek_v2", n_routed_experts=32, topk_method="group_limited_greedy",
                          n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=16.0),
}


def random_gate(method: str, seed: int):
    """A DeepSeek MoEGate of GATES[method] on the GPU in bf16, random weights (and score bias), and its ModelArgs."""
    from tandem.models.deepseek import ModelArgs, MoEGate

    torch.manual_seed(seed)
    args = ModelArgs.from_dict({**BASE, **GATES[method]})
    gate = MoEGate(args)
    torch.nn.init.normal_(gate.weight, std=0.1)
    if hasattr(gate, "e_score_correction_bias"):
        torch.nn.init.normal_(gate.e_score_correction_bias, std=0.05)
    return gate.to(DEV, torch.bfloat16), args


@pytest.mark.parametrize("method", list(GATES))
@pytest.mark.parametrize("n", [1, 7])
def test_route_out_grouped_matches_moe_gate(method, n):
    """The DeepSeek gate from its fp32 logits: the same expert sets as MoEGate, weights within 1e-5 relative
    (torch's softmax exp differs from libdevice's expf by up to ~25 fp32 ulps, measured 3.3e-6; a routing weight
    scales one expert's contribution, so 1e-5 of it is far below the bf16 output's 4e-3 step)."""
    from tandem.ops.moe import fp32_logits

    gate, a = random_gate(method, n + len(method))
    x = torch.randn(n, 512, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        ids, w = gate(x)
        logits = fp32_logits(x, gate.weight)
    k = a.num_experts_per_tok
    hx, hi, hw = pinned(8, 512, dtype=torch.bfloat16), pinned(8, k, dtype=torch.long), pinned(8, k, dtype=torch.float32)
    normalize = a.norm_topk_prob and k > 1
    staging.route_out_grouped(
        x, logits, getattr(gate, "e_score_correction_bias", None), sigmoid=a.scoring_func == "sigmoid",
        n_group=1 if a.topk_method == "greedy" else a.n_group, topk_group=a.topk_group or 1,
        top2=a.topk_method == "noaux_tc", top_k=k, renormalize=normalize,
        scale=a.routed_scaling_factor if a.v3_routing or not normalize else 1.0, hx=hx, hids=hi, hw=hw)
    torch.cuda.synchronize()
    got, want = hi[:n].sort(-1), ids.cpu().sort(-1)
    assert torch.equal(got.values, want.values)
    torch.testing.assert_close(hw[:n].gather(1, got.indices), w.cpu().gather(1, want.indices), rtol=1e-5, atol=0)
    assert torch.equal(hx[:n], x.cpu())
    torch.testing.assert_close(logits, torch.nn.functional.linear(x.float(), gate.weight.float()), rtol=1e-5,
                               atol=1e-5)
