"""Linears of one input as one projection (tandem.gpu.joined): one row of x with a bf16 / fp16 weight of N <= K
takes the GEMV (against a float64 product, eagerly and inside a decode graph), and GQA's q ‖ k ‖ v joined from
linear.marlin ops (their blocks concatenated) decodes the tokens of the module's own path and of the CPU model
holding the dequantized weights.

Tolerance of the GEMV against float64: fp32 sums (2^-16 of sum |x w| covers K = 512 with room), one rounding of
the product to bf16 / fp16 and one of the bias' add (half a step each: 2^-8 of the value in bf16). Decoded models:
the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from gpu_ref import dequantized_reference, write_rules

import tandem
from tandem.gpu import joined
from tandem.gpu.blocks import QuantTensor
from tandem.gpu.joined import join_linears

pytest.importorskip("triton")  # tandem.gpu.gemv imports it: CPU-only installs skip the whole file
from tandem.gpu import gemv  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda:0"


def count_gemv(monkeypatch) -> list[int]:
    """gemv.gemv wrapped: the N of each weight it is called with."""
    ns, run = [], gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, w, *a, **k: ns.append(w.n) or run(x, w, *a, **k))
    return ns


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_takes_the_gemv(dtype, bias, monkeypatch):
    torch.manual_seed(3)
    ns = count_gemv(monkeypatch)
    projs = [torch.nn.Linear(512, n, bias=bias).to(DEV, dtype) for n in (384, 64, 64)]
    x1, x6 = (torch.randn(m, 512, device=DEV, dtype=dtype) for m in (1, 6))
    w64 = torch.cat([p.weight.double() for p in projs])
    b64 = torch.cat([p.bias.double() for p in projs]) if bias else 0.0
    j = join_linears(projs, x1)
    assert j is not None and j.sizes == (384, 64, 64)
    for p in projs:  # views of the joined weight: no second copy
        assert p.weight.untyped_storage().data_ptr() == j.weight.untyped_storage().data_ptr()
    gemv_on = dtype != torch.float32 and joined.GEMV
    assert (j.gemv_weight is not None) == gemv_on
    y = j(x1)
    assert y.shape == (1, 512) and y.dtype == dtype and ns == ([512] if gemv_on else [])
    ref = x1.double() @ w64.T + b64
    # the sum's order, one rounding of the product and one of the bias' add (each at most half a step, 2^-8 of
    # the value in bf16)
    bound = 2**-7 * (ref.abs() + (b64.abs() if bias else 0.0)) + 2**-16 * (x1.double().abs() @ w64.abs().T)
    assert ((y.double() - ref).abs() <= bound).all()
    ns.clear()
    assert torch.equal(j(x6), torch.nn.functional.linear(x6, j.weight, j.bias)) and not ns  # 6 rows: cuBLAS


@pytest.mark.parametrize("sizes,on,want", [((128, 128), True, True), ((384, 64, 64), True, False),
                                           ((128, 128), False, False)])
def test_gemv_where_n_fits_k(sizes, on, want, monkeypatch):
    """The GEMV for joined weights of N <= K (cuBLAS splits K there); cuBLAS for wider ones, and with the switch
    off."""
    monkeypatch.setattr(joined, "GEMV", on)
    monkeypatch.setattr(joined, "GEMV_MAX_N_PER_K", 1.0)  # the default (TANDEM_JOINED_GEMV=all makes it inf)
    projs = [torch.nn.Linear(256, n, bias=False).to(DEV, torch.bfloat16) for n in sizes]
    j = join_linears(projs, torch.randn(1, 256, device=DEV, dtype=torch.bfloat16))
    assert (j.gemv_weight is not None) == want


ON_GPU = """
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
"""


def test_one_row_decode_graph_takes_the_gemv(helpers, tmp_path, monkeypatch):
    """bf16 llama placed by `default` rules (GQA decoding with the kernels), a batch-1 decode step captured and
    replayed (GraphRunner): q ‖ k ‖ v by the GEMV, replay equal to its eager warm-up, logits close to the same
    model with the GEMV switched off (cuBLAS)."""
    from test_graph_decode import PROMPTS

    from tandem.engine.graphs import GraphRunner
    from tandem.ops.attention import GQAKernels

    path = helpers.save_family("llama", tmp_path / "m")
    rules = write_rules(tmp_path, ON_GPU)
    ns = count_gemv(monkeypatch)
    monkeypatch.setattr(joined, "GEMV_MAX_N_PER_K", float("inf"))  # the tiny q ‖ k ‖ v: N = 128 > K = 64
    logits = {}
    for on in (False, True):
        monkeypatch.setattr(joined, "GEMV", on)
        llm = tandem.load(path, rules=rules, dtype="bfloat16", progress=False)
        a = llm.model.args
        n_qkv = (a.num_attention_heads + 2 * a.num_key_value_heads) * (a.hidden_size // a.num_attention_heads)
        prompt = torch.tensor(PROMPTS[1])
        cache, tables, _ = helpers.paged_logits(llm.model, [prompt], [(0, None)])  # the join: an eager prefill
        runner = GraphRunner(llm.model, cache, max_batch=1)
        ids, starts = torch.tensor([11], device="cuda"), [len(prompt)]
        ns.clear()
        with torch.inference_mode():
            first = llm.model.compute_logits(runner.decode(ids, tables, starts)).cpu()  # eager warm-up, capture
            replay = llm.model.compute_logits(runner.decode(ids, tables, starts)).cpu()
        assert runner.replays == 1
        assert helpers.rel_err(replay, first) <= 1e-6
        assert (n_qkv in ns) == on
        attns = [m for m in llm.model.modules() if isinstance(m, GQAKernels)]
        assert attns and all(m._qkv is not None and (m._qkv.gemv_weight is not None) == on for m in attns)
        logits[on] = replay
    assert helpers.rel_err(logits[True], logits[False]) <= 3e-2  # bf16 (test_attention_gpu's RTOL_BF16)


QUANT_RULES = '''
- match: {{name: "self_attn\\\\.(q_proj|k_proj|v_proj)$"}}
  replace:
    class: KTransformersLinear
    kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0", generate_op: "KLinearMarlin",
             prefill_op: "{prefill_op}"{fmt}}}
- match: {{name: "^model\\\\.layers\\\\.\\\\d+\\\\.(mlp|block_sparse_moe)\\\\.experts$"}}
  replace:
    class: tandem.ops.Experts
    kwargs: {{generate_device: "cpu", prefill_device: "cpu", out_device: "cuda:0"}}
  recursive: false
- match: {{name: ".*"}}
  replace: {{class: default, kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0"}}}}
'''


@pytest.mark.parametrize("name,fmt,prefill_op", [("qwen3_moe", "int8", "KLinearMarlin"),
                                                  ("qwen3_moe", None, "KLinearMarlin"),
                                                  ("qwen3_moe", "int8", "KLinearTorch"),
                                                  ("qwen2_moe", "int8", "KLinearMarlin")])
def test_gqa_joins_quantized_projections(name, fmt, prefill_op, tmp_path, monkeypatch, helpers):
    """linear.marlin q/k/v (int8 -> q8_0p: the GEMV; default: q4_0 at K = 64) join as one block weight, the CPU
    experts as host nodes, graphed decode: the tokens of the module's own path and of the CPU model holding the
    dequantized weights. A prefill kernel other than the generate one keeps prefill on the module's own path."""
    from test_graph_decode import NEW, PROMPTS, run

    from tandem.ops.attention import GQAKernels

    path = helpers.save_family(name, tmp_path / "m")
    rules = write_rules(tmp_path, QUANT_RULES.format(prefill_op=prefill_op,
                                                     fmt=f', weight_format: "{fmt}"' if fmt else ""))
    own = GQAKernels._joined_qkv
    outs = {}
    for on in (False, True):
        if not on:
            monkeypatch.setattr(GQAKernels, "_joined_qkv", lambda self, x: None)
        else:
            monkeypatch.setattr(GQAKernels, "_joined_qkv", own)
        llm = tandem.load(path, rules=rules, dtype="float32", progress=False)
        outs[on], engine = run(llm, graphs=True)
        assert engine.graphs.disabled is None and engine.graphs.replays > 0, engine.graphs.disabled
        attns = [m for m in llm.model.modules() if isinstance(m, GQAKernels)]
        assert attns
        for m in attns:
            if not on:
                assert m._qkv is None
                continue
            j = m._qkv
            assert j is not None and isinstance(j.weight, QuantTensor) and j.kernel is not None
            assert m._qkv_prefill == (prefill_op == "KLinearMarlin")
            for p in (m.q_proj, m.k_proj, m.v_proj):
                assert p.qweight.fmt == j.weight.fmt and p.weight.untyped_storage().data_ptr() == (
                    j.weight.data.untyped_storage().data_ptr())
            if fmt == "int8":
                assert j.weight.fmt == "q8_0p"
    ref = dequantized_reference(path, tandem.load(path, rules=rules, dtype="float32", progress=False))
    want = [ref.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(PROMPTS, NEW)]
    assert outs[True] == outs[False] == want
