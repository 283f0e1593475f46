"""GPU experts and quantized matmul (experts.marlin, the Triton kernels) against float references: the kernels
alone per format and dtype, GGUF conversion on the GPU, and every tiny family with its experts on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_ref import RTOL, dequantized_reference, rel_err, write_rules
from tiny import FAMILIES, make_hf, save_hf

import tandem
from tandem.gpu import blocks as B
from tandem.weights import gguf_quants as gq

pytestmark = pytest.mark.gpu
FORMATS = ["q8_0", "q4_0", "int4_g32", "int4_g128"]
# bf16 activations: the kernel rounds each dequantized weight to bf16 (2^-9 relative) and the output once;
# over K = 256 random terms that is ~1e-3 of the output norm; 1e-2 leaves room and still catches a wrong layout
BF16_RTOL = 1e-2


def _reference_experts(x, ids, w, g, u, d):
    out = torch.zeros(x.shape[0], d.shape[1], dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            xe = x[t].double()
            h = F.silu(g[e].double() @ xe) * (u[e].double() @ xe)
            out[t] += w[t, k].double() * (d[e].double() @ h)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [*FORMATS, "float"])
@pytest.mark.parametrize("m", [1, 7, 300])
def test_quant_linear_equals_its_dequantized_weight(fmt, dtype, m):
    from tandem.gpu.quant_matmul import quant_linear

    torch.manual_seed(0)
    w = torch.randn(200, 512, device="cuda") / 22
    qt = B.from_float(w.to(dtype), {"float": str(dtype).removeprefix("torch.")}.get(fmt, fmt))
    x = torch.randn(m, 512, device="cuda", dtype=dtype)
    bias = torch.randn(200, device="cuda", dtype=dtype)
    y = quant_linear(x, qt, bias)
    ref = x.double() @ qt.dequantize().to(dtype).double().T + bias.double()
    assert y.dtype == dtype and y.shape == (m, 200)
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else BF16_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [*FORMATS, "float"])
@pytest.mark.parametrize("tokens", [1, 8, 300])
def test_grouped_experts_equal_the_per_expert_loop(fmt, dtype, tokens):
    from tandem.gpu.quant_matmul import fused_experts

    torch.manual_seed(1)
    E, I, D, K = 16, 128, 256, 4  # noqa: E741
    g, u = torch.randn(E, I, D, device="cuda") / 16, torch.randn(E, I, D, device="cuda") / 16
    d = torch.randn(E, D, I, device="cuda") / 11
    f = {"float": str(dtype).removeprefix("torch.")}.get(fmt, fmt)
    w13, w2 = B.from_float(torch.cat((g, u), 1).to(dtype), f), B.from_float(d.to(dtype), f)
    x = torch.randn(tokens, D, device="cuda", dtype=dtype)
    ids = torch.randint(0, E, (tokens, K), device="cuda")
    ids[0, 1] = -1  # padding slot (hot experts masked, graph padding): skipped
    wts = torch.rand(tokens, K, device="cuda")
    y = fused_experts(x, ids, wts, w13, w2, F.silu)
    deq = w13.dequantize().to(dtype).float()
    ref = _reference_experts(x, ids, wts, deq[:, :I], deq[:, I:], w2.dequantize().to(dtype).float())
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 2 * BF16_RTOL)


@pytest.mark.parametrize("ggml_type", [8, 2, 3, 12, 14])
def test_gguf_conversion_on_the_gpu_equals_the_cpu(ggml_type):
    """The conversion a GPU runs at load gives the bytes the CPU gives (and the CPU's are tested exact)."""
    qt = gq.TYPES[ggml_type]
    rows, cols = 64, 512
    g = torch.Generator().manual_seed(ggml_type)
    raw = torch.randint(0, 256, (rows * cols // qt.block, qt.bytes), dtype=torch.uint8, generator=g)
    for at in {2: [0], 3: [0, 2], 8: [0], 12: [0, 2], 14: [208]}[ggml_type]:
        raw[:, at : at + 2] = (torch.rand(raw.shape[0], generator=g) * 0.02 + 1e-3).half().view(torch.uint8).view(-1, 2)
    cpu = B.from_gguf(raw.reshape(-1), ggml_type, (rows, cols), None, "cpu")
    gpu = B.from_gguf(raw.reshape(-1), ggml_type, (rows, cols), None, "cuda")
    assert gpu.fmt == cpu.fmt and gpu.data.is_cuda
    if cpu.fmt == "q8_0" and ggml_type == 14:  # requantized: torch.round on GPU and CPU agree; scales too
        assert (gpu.dequantize().cpu() - cpu.dequantize()).abs().max() <= cpu.dequantize().abs().max() / 127
    else:
        assert torch.equal(gpu.data.cpu(), cpu.data)


def _gpu_experts_rules(fmt: str) -> str:
    return f'''
- match: {{name: "\\\\.experts$"}}
  replace:
    class: KTransformersExperts
    kwargs: {{generate_device: "cuda:0", generate_op: "KExpertsMarlin", prefill_device: "cuda:0",
             prefill_op: "KExpertsMarlin", out_device: "cuda:0", weight_format: "{fmt}"}}
  recursive: false
- match: {{name: ".*"}}
  replace: {{class: default, kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0"}}}}
'''


IDS = [3, 17, 42, 7, 99, 1, 64, 12, 5, 150, 33]
MOE_FAMILIES = sorted(f for f in FAMILIES if f != "llama")


@pytest.mark.parametrize("fmt", ["fp32", "q8_0", "q4_0"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_family_with_gpu_experts_equals_cpu_reference(family, fmt, tmp_path):
    """Every tiny MoE family, routed experts on the GPU (experts.marlin): logits equal the CPU model with the same
    (dequantized) expert weights; greedy tokens equal."""
    path = save_hf(make_hf(family), tmp_path / "m")
    llm = tandem.load(path, rules=write_rules(tmp_path, _gpu_experts_rules(fmt)), dtype="float32", progress=False)
    ref = dequantized_reference(path, llm)
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) < RTOL
    assert llm.generate(IDS, max_new_tokens=5).token_ids == ref.generate(IDS, max_new_tokens=5).token_ids
