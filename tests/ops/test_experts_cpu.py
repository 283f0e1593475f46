"""experts.cpu (the C++ kernel) against the torch reference: exact by default in every model dtype, quantization
opt-in with its error measured, submit/wait, hot experts split off to another backend, tiny families end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import make_hf, save_hf

import tandem
from tandem.models.layers import Experts, GatedMLP
from tandem.ops.base import LoadContext, OpConfig
from tandem.ops.experts import CpuExperts, ExpertsOp, TorchExperts

NAME = "model.layers.0.mlp.experts"


class DictSource:
    """A weight source over a dict of tensors (what ExpertsOp reads through LoadContext.load)."""

    path = "dict"

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, dtype=None, device="cpu") -> torch.Tensor:
        return self.tensors[name].to(device=device, dtype=dtype, copy=True)


def experts(n: int = 6, dim: int = 64, hidden: int = 96, seed: int = 0, act: str = "silu") -> Experts:
    """Random experts with O(1) activations: weights ~ N(0, 1/fan_in)."""
    torch.manual_seed(seed)
    ex = Experts(GatedMLP(dim, hidden, act) for _ in range(n))
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, p.shape[1] ** -0.5)
    return ex


def make_op(ex: Experts, dtype: torch.dtype, op: str = "experts.cpu", **kwargs) -> ExpertsOp:
    source = DictSource({f"{NAME}.{k}": v.detach() for k, v in ex.state_dict().items()})
    cfg = OpConfig(NAME, "experts", generate_op=op, prefill_op=op, kwargs=kwargs)
    return ExpertsOp(ex, cfg, LoadContext(source, dtype))


def routing(n_tokens: int, n_experts: int, k: int = 2, dim: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, dim, generator=g)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n_tokens)])
    w = torch.rand(n_tokens, k, generator=g)
    return x, ids, w / w.sum(1, keepdim=True)


def reference64(ex: Experts, x, ids, w, dtype: torch.dtype) -> torch.Tensor:
    """float64 experts on the weights and inputs as rounded to `dtype` (what both backends are given)."""
    stacked = [torch.stack([getattr(e, p).weight.detach().to(dtype).double() for e in ex]) for p in ex.proj_names]
    return TorchExperts(*stacked, F.silu, "cpu").forward(x.to(dtype).double(), ids, w.double())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------- exact by default


def test_fp32_kernel_equals_the_reference():
    ex = experts()
    x, ids, w = routing(37, 6)
    op, ref = make_op(ex, torch.float32), make_op(ex, torch.float32, "experts.torch")
    b = op.backends["generate"]
    assert isinstance(b, CpuExperts) and b.fmt == ("fp32",) * 3
    assert op.backends["prefill"] is b  # one kernel for both phases
    y = op(x, ids, w)
    assert y.dtype == torch.float32
    # same fp32 products, another summation order: float32 rounding (2^-24 per add, ~1e-7 relative over ~100)
    assert rel(y, ref(x, ids, w)) <= 1e-6
    assert rel(y, reference64(ex, x, ids, w, torch.float32)) <= 1e-6


def test_bf16_kernel_within_bf16_rounding():
    ex = experts()
    x, ids, w = routing(37, 6)
    xb = x.bfloat16()
    op, ref = make_op(ex, torch.bfloat16), make_op(ex, torch.bfloat16, "experts.torch")
    assert op.backends["generate"].fmt == ("bf16",) * 3
    y = op(xb, ids, w)
    assert y.dtype == torch.bfloat16
    exact = reference64(ex, x, ids, w, torch.bfloat16)
    # the kernel keeps fp32 activations and accumulators and rounds once, on output: 2^-9 relative per element
    assert rel(y, exact) <= 2**-9
    # the torch reference rounds every intermediate to bf16; the kernel is never worse than it
    assert rel(y, exact) <= rel(ref(xb, ids, w), exact)


def test_fp16_model_is_held_in_fp32():
    ex = experts()
    x, ids, w = routing(19, 6)
    op = make_op(ex, torch.float16)
    assert op.backends["generate"].fmt == ("fp32",) * 3  # fp16 values exactly, computed in fp32
    y = op(x.half(), ids, w)
    assert y.dtype == torch.float16
    assert rel(y, reference64(ex, x, ids, w, torch.float16)) <= 2**-11  # one fp16 rounding of the output


def test_padding_ids_and_empty_batches():
    ex = experts()
    x, ids, w = routing(9, 6)
    ids[::2, 1] = -1  # padding slots are skipped by both backends
    op, ref = make_op(ex, torch.float32), make_op(ex, torch.float32, "experts.torch")
    assert rel(op(x, ids, w), ref(x, ids, w)) <= 1e-6
    assert op(x[:0], ids[:0], w[:0]).shape == (0, 64)


def test_threads_kwarg_sets_the_kernel_pool():
    from tandem.kernels import cpu

    before = cpu.num_threads()
    try:
        make_op(experts(), torch.float32, threads=1)
        assert cpu.num_threads() == 1
    finally:
        cpu.set_num_threads(before)


# ------------------------------------------------------------------------------------------- opt-in quantization

# Relative error against float64 on these Gaussian weights (fan-in scaled), bounded from first principles:
# uniform rounding of step s errs by s/sqrt(12); int8 s = absmax/127 (~2.5 sigma over 32 values) -> 0.6% per
# matrix; int4 s = range/15 (~4.1 sigma over 32 values, ~5.2 over 128) -> 8% / 10%. Gate, up and down compound
# as sqrt(3) of that (int8 adds its two int8 activation roundings): ~1.2%, ~14%, ~17% (measured 1.3%, 14.1%,
# 17.8%). Upper bounds 1.3x the estimate; the lower bound shows the format was applied.
QUANT = {"int8": (0.005, 0.02), "int4_g32": (0.07, 0.19), "int4_g128": (0.09, 0.23)}


@pytest.mark.parametrize("fmt", sorted(QUANT))
def test_weight_format_error_is_measured(fmt):
    ex = experts(n=4, dim=128, hidden=256)
    x, ids, w = routing(33, 4, dim=128)
    op = make_op(ex, torch.float32, weight_format=fmt)
    assert op.backends["generate"].fmt == (fmt,) * 3
    err = rel(op(x, ids, w), reference64(ex, x, ids, w, torch.float32))
    lo, hi = QUANT[fmt]
    assert lo <= err <= hi, f"{fmt}: relative error {err:.4f}"


def test_int8_row_is_converted_by_the_kernel_and_not_streamed():
    """weight_format int8_row: one scale per row, converted in C++ into kernel memory; its error is int8's order
    (decode: activations per 32; many tokens per expert: the int8 GEMM, activations per token -- at dim 128,
    hidden 256 about 1.5-2.5%); no blocks(), so the GPU streamer's cpu_blocks leaves the layer on the CPU."""
    ex = experts(n=4, dim=128, hidden=256)
    x, ids, w = routing(33, 4, dim=128)
    b = make_op(ex, torch.float32, weight_format="int8_row").backends["generate"]
    assert b.fmt == ("int8_row",) * 3 and b.origin == "converted at load" and not hasattr(b, "blocks")
    ref = reference64(ex, x, ids, w, torch.float32)
    assert rel(b.forward(x, ids, w), ref) < 0.03
    from tandem.gpu.transfer import cpu_blocks

    assert cpu_blocks(b) is None
    with pytest.raises(ValueError, match=f"{NAME}: weight_format int8_row does not fit these experts"):
        make_op(experts(dim=128, hidden=96), torch.float32, weight_format="int8_row")  # rows of 96 values


def test_int4_with_group_size_and_bad_formats():
    ex = experts(n=4, dim=128, hidden=256)
    assert make_op(ex, torch.float32, weight_format="int4", group_size=128).backends["generate"].fmt[0] == "int4_g128"
    with pytest.raises(ValueError, match=f"{NAME}: weight_format 'q4_k' is not one experts.cpu converts to"):
        make_op(ex, torch.float32, weight_format="q4_k")
    with pytest.raises(ValueError, match=f"{NAME}: weight_format int4_g32 does not fit the down projection"):
        make_op(experts(dim=128, hidden=96), torch.float32, weight_format="int4_g32")  # down rows of 96


def test_non_silu_experts_are_refused():
    with pytest.raises(ValueError, match="experts.cpu computes SiLU-gated experts"):
        make_op(experts(act="gelu"), torch.float32)


# ------------------------------------------------------------------------------------------- submit / wait


def test_submit_wait_equals_forward_and_fills_out():
    ex = experts()
    x, ids, w = routing(21, 6)
    op = make_op(ex, torch.float32)
    want = op(x, ids, w)
    h = op.submit(x, ids, w)
    assert torch.equal(h.wait(), want)
    out = torch.empty(21, 64)
    assert op.submit(x, ids, w, out=out).wait() is out and torch.equal(out, want)
    ref = make_op(ex, torch.float32, "experts.torch")
    out2 = torch.empty(21, 64)
    assert ref.submit(x, ids, w, out=out2).wait() is out2 and torch.equal(out2, ref(x, ids, w))


def test_blocks_are_the_kernels_weights():
    ex = experts(n=4, dim=128, hidden=256)
    b = make_op(ex, torch.float32, weight_format="int8").backends["generate"]
    fmt, gate, up, down = b.blocks()
    assert fmt == "int8" and gate.dtype == torch.uint8
    assert gate.shape == (4, 256, 128 // 32 * 34) and down.shape == (4, 128, 256 // 32 * 34)
    fmt, gate, _, down = make_op(ex, torch.float32).backends["generate"].blocks()
    assert fmt == "fp32" and torch.equal(gate[1].view(torch.float32), ex[1].gate_proj.weight.detach())


# ------------------------------------------------------------------------------------------- hot experts


@pytest.mark.parametrize("hot", [[1, 4], {0: [0, 2, 5], 3: [1]}])
def test_hot_experts_equal_all_cpu(hot):
    ex = experts()
    x, ids, w = routing(40, 6)
    full = make_op(ex, torch.float32)
    split = make_op(ex, torch.float32, hot_experts=hot, hot_device="cpu")
    assert split.hot.ids == (hot if isinstance(hot, list) else hot[0])
    assert isinstance(split.hot.backend, TorchExperts)
    # hot experts in torch, the rest in the kernel, summed: float32 rounding of a different summation order
    assert rel(split(x, ids, w), full(x, ids, w)) <= 1e-6
    torch_split = make_op(ex, torch.float32, "experts.torch", hot_experts=hot)
    assert rel(torch_split(x, ids, w), make_op(ex, torch.float32, "experts.torch")(x, ids, w)) <= 1e-6


def test_hot_experts_bad_ids():
    with pytest.raises(ValueError, match=f"{NAME}: hot_experts names expert 9, outside"):
        make_op(experts(), torch.float32, hot_experts=[9])
    with pytest.raises(ValueError, match="hot_experts must be a list of expert ids"):
        make_op(experts(), torch.float32, hot_experts="1,2")


# ------------------------------------------------------------------------------------------- tiny families

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
IDS = [3, 17, 42, 7, 99, 1, 64, 12, 5, 150, 33, 80]


@pytest.fixture(scope="module", params=MOE)
def family_dir(request, tmp_path_factory):
    return save_hf(make_hf(request.param), tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_families_through_experts_cpu(family_dir, dtype):
    ref = tandem.load(family_dir, dtype=dtype, progress=False)  # experts in the model's own torch layer
    llm = tandem.load(family_dir, rules="cpu", dtype=dtype, progress=False)
    kernels = [m.backends["generate"] for m in llm.model.modules() if isinstance(m, ExpertsOp)]
    assert kernels and all(isinstance(k, CpuExperts) for k in kernels)
    err = rel(llm.logits(IDS), ref.logits(IDS))
    # fp32: summation order only (measured ~3e-7). bf16: the torch layer rounds each intermediate to bf16 and the
    # kernel only its output; 2-3 layers of that differ by ~1% (measured 0.7%)
    assert err <= (1e-5 if dtype == "float32" else 3e-2)
    if dtype == "float32":
        assert llm.generate(IDS, max_new_tokens=5).token_ids == ref.generate(IDS, max_new_tokens=5).token_ids
