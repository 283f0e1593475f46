"""FP8 E4M3 weights with 128 x 128 block scales (linear.fp8's fp8_e4m3 rows): quantizing as FP8 checkpoints do,
the rows' exact values, an FP8 checkpoint's bytes loaded as they are. The kernels that read the rows are tested on
a GPU (tests/gpu/test_gemv.py, test_linear_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from tiny import WIDE, make_hf, save_hf, to_fp8_checkpoint

import tandem
from tandem.gpu import blocks as B
from tandem.ops.base import LoadContext
from tandem.ops.linear import linear_format, load_quantized
from tandem.weights import SafetensorsSource


def _expand(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]


@pytest.mark.parametrize("n,k", [(300, 384), (128, 128), (7, 256)])
def test_fp8_rows_hold_the_checkpoint_values_exactly(n, k):
    g = torch.Generator().manual_seed(n + k)
    # magnitudes over 12 decades: blocks whose small values fall on E4M3 subnormals
    w = torch.randn(n, k, generator=g) * torch.exp(torch.empty(n, k).uniform_(-14, 0, generator=g))
    q, scale = B.fp8_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (-(-n // 128), k // 128)
    rows = B.fp8_rows(q, scale)
    assert rows.fmt == B.FP8 and rows.shape == (n, k) and rows.data.shape == (n, B.row_bytes(B.FP8, k))
    exact = q.float() * _expand(scale, n, k)  # what the checkpoint means: w = q * scale_inv, in fp32
    assert torch.equal(rows.dequantize(), exact)
    # round to nearest E4M3: half a step of 3 mantissa bits, or half the subnormal step (scale 2^-10)
    err = (exact - w).abs()
    bound = torch.maximum(w.abs() * 2.0**-4, _expand(scale, n, k) * 2.0**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    subnormal = (q.float().abs() < 2.0**-6) & (q.float() != 0)
    assert subnormal.any()  # the case is exercised


def test_fp8_quantize_takes_the_block_max_to_448():
    w = torch.randn(256, 256)
    w[3, 5] = 9.0
    q, scale = B.fp8_quantize(w)
    assert scale[0, 0] == pytest.approx(9.0 / 448) and q[3, 5].float() == 448.0
    z = B.fp8_quantize(torch.zeros(128, 128))
    assert torch.equal(z[1], torch.ones(1, 1)) and not z[0].float().any()  # a zero block: scale 1, values 0


def test_fp8_rows_refuse_what_they_cannot_hold():
    q = torch.zeros(130, 256).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"w\.q: FP8 scales have shape \[1, 2\].*needs \[2, 2\]"):
        B.fp8_rows(q, torch.ones(1, 2), what="w.q")
    with pytest.raises(ValueError, match="128 x 128 block scales.*blocks \\[64, 64\\]"):
        B.fp8_rows(q, torch.ones(3, 4), block=(64, 64))
    with pytest.raises(ValueError, match="K % 128 == 0"):
        B.from_float(torch.randn(4, 96), B.FP8)


def test_linear_format_for_linear_fp8():
    assert linear_format(256, None, None, "m.o_proj", fp8=True) == B.FP8
    assert linear_format(64, None, None, "m.o_proj", fp8=True) == "float"  # not whole blocks: the float weight
    with pytest.raises(ValueError, match="rule for m.o_proj: linear.fp8 holds FP8 E4M3 weights; weight_format 'int4'"):
        linear_format(256, "int4", None, "m.o_proj", fp8=True)


def test_an_fp8_checkpoint_loads_its_bytes_as_they_are(tmp_path):
    path = to_fp8_checkpoint(save_hf(make_hf("deepseek_v3", **WIDE), tmp_path / "m"))
    src = SafetensorsSource.open(path)
    name = "model.layers.1.self_attn.o_proj.weight"
    q, scale = (t.clone() for t in src.fp8(name))
    assert q.dtype == torch.float8_e4m3fn and src.fp8("model.norm.weight") is None
    w = load_quantized(LoadContext(src, torch.float32), name, tuple(q.shape), "cpu", B.FP8)
    assert torch.equal(w.data[:, : q.shape[1]], q.view(torch.uint8))  # no requantizing: the file's values
    assert torch.equal(w.dequantize(), q.float() * _expand(scale.float(), *q.shape))
    # the float path (linear.torch, the CPU) dequantizes the same values
    assert torch.equal(src.get(name, dtype=torch.float32), w.dequantize())
    with pytest.raises(ValueError, match="o_proj.weight has shape .* the config implies"):
        load_quantized(LoadContext(src, torch.float32), name, (q.shape[0], q.shape[1] * 2), "cpu", B.FP8)


def test_a_gguf_float_tensor_is_quantized_to_fp8_at_load():
    """GGUF holds no FP8 blocks: linear.fp8 quantizes the file's float weight (bf16 here) as FP8 checkpoints do."""
    w = torch.randn(256, 384).bfloat16()

    class GGUFLike:  # a GGUF source's two entry points: raw blocks and dequantized floats
        def __contains__(self, name):
            return name == "w"

        def raw(self, name):
            return 30, w.view(torch.uint8).reshape(-1), (256, 384)

        def get(self, name, dtype=None, device="cpu"):
            return w.to(device=device, dtype=dtype)

    got = load_quantized(LoadContext(GGUFLike(), torch.float32), "w", (256, 384), "cpu", B.FP8)
    assert got.fmt == B.FP8 and torch.equal(got.data, B.from_float(w.float(), B.FP8).data)


def test_an_fp8_checkpoint_runs_on_the_cpu(tmp_path):
    """The FP8 checkpoint on the CPU is the model of its values w = q s: the same logits as a float32 checkpoint
    holding those values (written here, each tensor dequantized in float64)."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = to_fp8_checkpoint(save_hf(make_hf("deepseek_v3", **WIDE), tmp_path / "fp8"))
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    for f in plain.glob("*.safetensors"):
        t = load_file(f)
        for name in [n for n in t if n + "_scale_inv" in t]:
            q, s = t[name], t.pop(name + "_scale_inv")
            t[name] = (q.double() * _expand(s.double(), *q.shape)).float()
        save_file(t, f, metadata={"format": "pt"})
    ids = [3, 17, 42, 7, 99]
    got = tandem.load(path, rules="none", dtype="float32", progress=False).logits(ids).double()
    ref = tandem.load(plain, rules="none", dtype="float32", progress=False).logits(ids).double()
    assert (got - ref).norm() / ref.norm() < 1e-6
