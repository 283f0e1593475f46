"""GGUF experts on the CPU kernel: block types it runs are used as the file stores them (no dequantize, the
kernel reads the mapping), other types are converted once at load with one log line; logits against the
dequantized-weights reference."""

from __future__ import annotations

import logging
from unittest import mock

import numpy as np
import pytest
import torch
from kquants import QUANTIZE

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402
from test_gguf_model import _model, random_blocks, rel_err, write_gguf  # noqa: E402

import tandem  # noqa: E402
import tandem.weights.gguf as gguf_source  # noqa: E402
from tandem.ops.experts import CpuExperts, ExpertsOp, convert_target  # noqa: E402
from tandem.weights.gguf_quants import TYPES  # noqa: E402

IDS = list(range(3, 40))
# Integer kernel formats quantize activations to int8 per block (absmax / 127) before each dot product: the
# rounding step is ~2.5-3 sigma / 127 of a block of 32-256 values, an error of step/sqrt(12) ~ 0.7% per
# activation; x and the gated hidden state are each rounded once per expert, so an expert's output is off by
# ~1%, and the residual stream (attention, norms exact) dilutes it in the logits. Measured 0.5-0.7% here.
TOL_INT8_ACTIVATIONS = 1.5e-2


def quantizer(qtype: T, rng):
    """quant(name, array) for write_gguf: experts in `qtype`, everything else float32."""

    def quant(name, a):
        if ".experts." not in name or qtype == T.F32:
            return None
        flat = a.reshape(-1, a.shape[-1]).astype(np.float32)
        if qtype == T.BF16:
            raw = torch.from_numpy(flat).bfloat16().view(torch.uint8).numpy()
        elif qtype.name in QUANTIZE:
            raw = QUANTIZE[qtype.name](flat)
        elif qtype in (T.Q2_K, T.Q3_K, T.IQ4_XS):  # no quantizer at hand: random valid blocks of the same spread
            raw = random_blocks(flat.shape[0], flat.shape[1], qtype, rng)
        else:
            raw = ref_quantize(flat, qtype)
        return raw.reshape(*a.shape[:-1], -1), qtype

    return quant


def write(tmp_path, qtype: T, per_expert: bool = False):
    hf, family = _model("mixtral_256")  # rows of 256: every K-quant fits
    return write_gguf(hf, tmp_path / f"{qtype.name}.gguf", family, quant=quantizer(qtype, np.random.default_rng(0)),
                      per_expert=per_expert)


def load_counting_dequantize(path, **kwargs):
    """tandem.load with every dequantize of a quantized block type recorded (type names)."""
    seen: list[str] = []
    real = gguf_source.dequantize

    def spy(data, ggml_type, *a, **kw):
        if TYPES[ggml_type].float_dtype is None:
            seen.append(TYPES[ggml_type].name)
        return real(data, ggml_type, *a, **kw)

    with mock.patch.object(gguf_source, "dequantize", spy):
        llm = tandem.load(path, progress=False, **kwargs)
    return llm, seen


def kernels(llm) -> list[CpuExperts]:
    return [m.backends["generate"] for m in llm.model.modules() if isinstance(m, ExpertsOp)]


RAW = [T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.BF16]


@pytest.mark.parametrize("qtype", RAW, ids=lambda t: t.name)
def test_kernel_block_types_run_as_stored(tmp_path, qtype):
    path = write(tmp_path, qtype)
    ref = tandem.load(path, rules="none", dtype="float32", progress=False)  # everything dequantized, torch
    llm, dequantized = load_counting_dequantize(path, rules="cpu", dtype="float32")
    assert dequantized == []  # no expert block went through a dequantizer
    ks = kernels(llm)
    assert len(ks) == 2 and all(k.fmt == (qtype.name.lower().replace("q8_0", "int8"),) * 3 for k in ks)
    # the kernel reads the file's mapping itself: its buffer is the stored tensor's bytes
    _, data, _ = llm_source(path).raw("model.layers.1.block_sparse_moe.experts.down_proj")
    assert bytes(ks[1].buffers[2].numpy()) == bytes(data.numpy())
    assert "as the GGUF file stores them" in ks[0].describe()
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) <= TOL_INT8_ACTIVATIONS


def llm_source(path):
    from tandem.checkpoint import open_checkpoint

    return open_checkpoint(path).source


def test_stacked_blocks_are_mapped_not_copied(tmp_path):
    path = write(tmp_path, T.Q4_K)
    src = llm_source(path)
    blocks = src.expert_blocks("model.layers.0.block_sparse_moe.experts", ("w1", "w3", "w2"), 4)
    _, data, _ = src.raw("model.layers.0.block_sparse_moe.experts.gate_proj")
    assert blocks[0].data.data_ptr() == data.data_ptr() and blocks[0].shape == (4, 256, 256)


MMAP_RULE = """
- match: {name: '^model\\.layers\\.\\d+\\.block_sparse_moe\\.experts$'}
  replace: {class: tandem.ops.Experts, kwargs: {generate_device: cpu, prefill_device: cpu, use_mmap: %s}}
  recursive: false
- match: {name: '.*'}
  replace: {class: default, kwargs: {generate_device: cpu, prefill_device: cpu}}
"""


def test_use_mmap_false_copies_the_blocks(tmp_path):
    """By default the kernel reads the file's mapping in place; use_mmap: false holds its own copy (huge pages)
    and blocks() reads that copy. Same bytes, same outputs."""
    path = write(tmp_path, T.Q4_K)
    _, data, _ = llm_source(path).raw("model.layers.1.block_sparse_moe.experts.down_proj")
    mapped = kernels(tandem.load(path, rules="cpu", dtype="float32", progress=False))
    assert not any(k.kernel.owns_weights for k in mapped) and "mapped from the file" in mapped[0].describe()
    rule = tmp_path / "copy.yaml"
    rule.write_text(MMAP_RULE % "false")
    copied = kernels(tandem.load(path, rules=str(rule), dtype="float32", progress=False))
    assert all(k.kernel.owns_weights for k in copied) and "mapped" not in copied[0].describe()
    for ks in (copied, mapped):
        assert bytes(ks[1].blocks()[3].numpy()) == bytes(data.numpy())
    assert copied[1].buffers[2].data_ptr() != data.data_ptr()
    x = torch.randn(5, copied[0].kernel.H)
    ids, w = torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    assert torch.equal(copied[1].forward(x, ids, w), mapped[1].forward(x, ids, w))
    rule.write_text(MMAP_RULE % "'yes'")
    with pytest.raises(ValueError, match=r"experts: use_mmap must be true or false, got 'yes'"):
        tandem.load(path, rules=str(rule), dtype="float32", progress=False)


def test_per_expert_tensors_and_mixed_types(tmp_path):
    """Older Mixtral files (blk.N.ffn_gate.E.weight), and Q4_K_M's mix: gate/up Q4_K, down Q6_K."""
    hf, family = _model("mixtral_256")
    rng = np.random.default_rng(1)
    q4k, q6k = quantizer(T.Q4_K, rng), quantizer(T.Q6_K, rng)
    path = write_gguf(hf, tmp_path / "m.gguf", family, per_expert=True,
                      quant=lambda name, a: (q6k if ".experts.down" in name else q4k)(name, a))
    ref = tandem.load(path, rules="none", dtype="float32", progress=False)
    llm, dequantized = load_counting_dequantize(path, rules="cpu", dtype="float32")
    assert dequantized == [] and all(k.fmt == ("q4_k", "q4_k", "q6_k") for k in kernels(llm))
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) <= TOL_INT8_ACTIVATIONS


def test_float_experts_stay_exact(tmp_path):
    path = write(tmp_path, T.F32)
    ref = tandem.load(path, rules="none", dtype="float32", progress=False)
    llm, _ = load_counting_dequantize(path, rules="cpu", dtype="float32")
    assert all(k.fmt == ("fp32",) * 3 for k in kernels(llm))
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) <= 1e-5  # fp32 kernel: summation order only


# Types the kernel does not run -> (format, bound on the converted weights' error, bound on the logits' error),
# errors relative to the file's dequantized values. Q4_1 -> int4_g32 is Q4_1's own layout (fp16 scale and min per
# 32, the same rounding rule): lossless (measured 0), so only the int8 activations remain in the logits. Q5_0 ->
# int8 rounds again to Q8_0's step, absmax/127 of 32 values: ~0.6% (measured 0.5%). Q2_K / IQ4_XS (random valid
# blocks) -> int4_g32 rounds each group of 32 to 16 levels: <= 8% (measured 3.9%, 6.8%); over gate, up and down
# that compounds to ~sqrt(3) x per expert and passes through both layers (measured 13-15% in the logits).
CONVERTED = {T.Q4_1: ("int4_g32", 1e-6, TOL_INT8_ACTIVATIONS), T.Q5_0: ("int8", 1e-2, 2e-2),
             T.Q2_K: ("int4_g32", 8e-2, 0.25), T.IQ4_XS: ("int4_g32", 8e-2, 0.25),
             T.F16: ("fp32", 0.0, 1e-5)}  # F16 -> the model dtype (fp32 here): exact, summation order only


@pytest.mark.parametrize("qtype", list(CONVERTED), ids=lambda t: t.name)
def test_other_types_are_converted_once_with_one_log_line(tmp_path, qtype, caplog):
    path = write(tmp_path, qtype)
    ref = tandem.load(path, rules="none", dtype="float32", progress=False)
    with caplog.at_level(logging.INFO, logger="tandem"):
        llm = tandem.load(path, rules="cpu", dtype="float32", progress=False)
    fmt, weight_tol, logits_tol = CONVERTED[qtype]
    ks = kernels(llm)
    assert all(k.fmt == (fmt,) * 3 for k in ks)
    said = [r.getMessage() for r in caplog.records if "not a CPU kernel format" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"GGUF experts in {qtype.name} ") and f" to {fmt} " in said[0]
    placement = [r.getMessage() for r in caplog.records if r.getMessage().startswith("routed experts: ")]
    assert placement == [f"routed experts: experts.cpu on cpu ({ks[0].describe()})"]
    # the weights as the kernel holds them, against the file's own values
    _, data, shape = llm_source(path).raw("model.layers.1.block_sparse_moe.experts.down_proj")
    want = torch.from_numpy(ref_dequantize(data.numpy(), qtype).reshape(shape).copy())
    got = torch.stack([ks[1].kernel.dequantize("down", e) for e in range(shape[0])])
    assert rel_err(got, want) <= weight_tol
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) <= logits_tol


def test_convert_target_by_bits_per_weight():
    def stored(name):
        return gguf_source.StoredExperts(next(t for t, q in TYPES.items() if q.name == name), torch.empty(0),
                                         (1, 1, 1), None)

    assert convert_target(stored("Q4_1"), 1536, torch.float32) == "int4_g32"
    assert convert_target(stored("Q4_1"), 576, torch.float32) == "int8"  # 576 is not whole 128-value blocks
    assert convert_target(stored("Q5_1"), 1536, torch.float32) == "int8"  # 6 bits: int4 would lose some
    assert convert_target(stored("Q3_K"), 1536, torch.float32) == "int4_g32"
    assert convert_target(stored("F16"), 1536, torch.bfloat16) == "bf16"
    assert convert_target(stored("F16"), 1536, torch.float16) == "fp32"


def test_kquant_quantizer_round_trips_through_gguf():
    """tests/weights/kquants.py against the gguf package's dequantizer (an independent reading of the layout)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 512)) / 16).astype(np.float32)
    # min/max rounding: step range/15, /31, absmax/31 of groups of 32, 32, 16 -> ~8%, ~4%, ~2% relative
    for name, bound in (("Q4_K", 0.1), ("Q5_K", 0.05), ("Q6_K", 0.025)):
        y = ref_dequantize(QUANTIZE[name](x), T[name]).reshape(x.shape)
        assert np.linalg.norm(y - x) / np.linalg.norm(x) <= bound, name
