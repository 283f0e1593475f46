"""`tandem synth PRESET --gguf --quant Q4_1`: routed experts in ggml's Q4_1 (bytes equal to the gguf package's
quantizer on the same floats), every other matrix BF16, norms and routers F32; tandem runs the experts on the CPU
kernel as int4_g32 with the file's values unchanged, and its logits match the dequantized-weights reference."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

import tandem
from tandem.checkpoint import open_checkpoint
from tandem.ops.experts import ExpertsOp
from tandem.synth import preset_config
from tandem.synth_gguf import quantize_q4_1, random_blocks, rescale_blocks, write_gguf
from tandem.weights.gguf_quants import NAMES, dequantize

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

IDS = list(range(3, 40))
# The kernel's integer formats round activations to int8 per block before each dot product (absmax / 127, an
# error of ~0.7% per activation, ~1% per expert output; attention and norms exact), so logits differ from the
# float32 dequantized-weights reference by ~0.5-1% (tests/weights/test_gguf_experts.py's TOL_INT8_ACTIVATIONS);
# the weights themselves are not rounded again (Q4_1 -> int4_g32 keeps d, m and the quants).
TOL_INT8_ACTIVATIONS = 1.5e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_quantize_q4_1_equals_the_gguf_package():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4096, 32), dtype=np.float32) * rng.uniform(1e-3, 2.0, (4096, 1)).astype(np.float32)
    x[0] = 0.25  # constant block: d = 0, every quant 0
    x[1, ::2] = x[1, 0]  # repeated extremes
    x[2] = np.round(x[2] * 4) / 4  # values on exact half steps: the rounding rule decides
    ours = quantize_q4_1(x)
    want = ref_quantize(x.reshape(-1, 256), T.Q4_1).reshape(-1, 20)  # rows of whole blocks, as ggml quantizes
    assert ours.shape == (4096, 20) and np.array_equal(ours, want)
    # ggml's layout, read back by tandem's dequantizer: the error is at most half a step d/2 per value
    back = dequantize(torch.from_numpy(ours.reshape(-1)), NAMES["Q4_1"], (4096, 32)).numpy()
    d = ours[:, 0:2].copy().view(np.float16).astype(np.float32)
    assert (np.abs(back - x) <= d * 0.5 + 1e-3 * np.abs(x).max(axis=1, keepdims=True)).all()  # + fp16 d, m


def test_random_q4_1_blocks_have_the_intended_spread_and_rescale_keeps_the_quants():
    rng = np.random.default_rng(0)
    blocks = random_blocks("Q4_1", 1 << 15, 0.02, rng)
    vals = dequantize(torch.from_numpy(blocks.reshape(-1)), NAMES["Q4_1"], (1 << 15, 32))
    assert abs(vals.mean().item()) < 1e-3 and vals.std().item() == pytest.approx(0.02, rel=0.03)
    scaled = blocks.copy()
    rescale_blocks(scaled, "Q4_1", 0.02, rng)
    assert np.array_equal(scaled[:, 4:], blocks[:, 4:])  # quants kept, d and m scaled by one factor per block
    f = scaled[:, 0:2].copy().view(np.float16).astype(np.float32) / blocks[:, 0:2].copy().view(np.float16)
    g = scaled[:, 2:4].copy().view(np.float16).astype(np.float32) / blocks[:, 2:4].copy().view(np.float16)
    assert (f > 0.74).all() and (f < 1.26).all() and np.allclose(f, g, rtol=2e-3)  # fp16 rounding of each


def _config(preset: str) -> dict:
    """The tiny preset with rows of 128 values, so every expert matrix is whole int4_g32 blocks, and one MoE layer
    (after DeepSeek's dense one): its router sees the same exact hidden states in both runs, so the comparison
    measures the kernel's rounding, not a routing flip at a near-tie that rounding in an earlier MoE layer can
    cause (seen: one position of 37 at 40% with two MoE layers)."""
    cfg = preset_config(preset)
    return {**cfg, "hidden_size": 128, "moe_intermediate_size": 128,
            "num_hidden_layers": 1 + (cfg.get("first_k_dense_replace") or 0)}


@pytest.mark.parametrize("preset,quant", [("tiny-qwen3-moe", "Q4_1"), ("tiny-deepseek-v3", "Q4_1"),
                                          ("tiny-deepseek-v3", "Q4_1-Q8_0")])
def test_q4_1_experts_load_as_int4_g32_unchanged_and_match_the_reference(tmp_path, preset, quant, caplog):
    path = write_gguf(_config(preset), tmp_path / "m.gguf", quant, progress=False)
    r = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    rows = {t.name: int(t.shape[0]) for t in r.tensors}  # ggml order: the row length first
    assert r.fields["general.file_type"].contents() == 3  # LLAMA_FTYPE_MOSTLY_Q4_1
    for name, t in types.items():
        if "_exps." in name:
            assert t == "Q4_1", name
        elif "_norm." in name or "ffn_gate_inp" in name or name.endswith(("bias", ".exp_probs_b.bias")):
            assert t == "F32", name
        elif quant == "Q4_1":
            assert t == "BF16", name
        else:  # Q8_0, or F16 where a row is not whole blocks of 32 (llama-quantize's fallback)
            assert t == ("Q8_0" if rows[name] % 32 == 0 else "F16"), name
    ref = tandem.load(path, rules="none", dtype="float32", progress=False)
    with caplog.at_level(logging.INFO, logger="tandem"):
        llm = tandem.load(path, rules="cpu", dtype="float32", progress=False)
    assert any("GGUF experts in Q4_1 " in m and " to int4_g32 " in m for m in caplog.messages)
    ks = [m.backends["generate"] for m in llm.model.modules() if isinstance(m, ExpertsOp)]
    assert ks and all(k.fmt == ("int4_g32",) * 3 for k in ks)
    # the kernel's weights are the file's values exactly (d, m and quants moved, not recomputed)
    source = open_checkpoint(path).source
    layer = next(i for i in range(2) if f"blk.{i}.ffn_down_exps.weight" in types)
    prefix = f"model.layers.{layer}.mlp.experts"
    stored = source.expert_blocks(prefix, ("gate_proj", "up_proj", "down_proj"), ks[0].kernel.E)
    for p, role in enumerate(("gate", "up", "down")):
        want = torch.stack([stored[p].expert(e) for e in range(stored[p].shape[0])])
        got = torch.stack([ks[0].kernel.dequantize(role, e) for e in range(stored[p].shape[0])])
        assert torch.equal(got.float(), want), role
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) <= TOL_INT8_ACTIVATIONS


def test_cli_writes_q4_1_and_the_model_generates(tmp_path):
    out = tmp_path / "q.gguf"
    r = subprocess.run([sys.executable, "-m", "tandem", "synth", "tiny-qwen3-moe", "--gguf", "--quant", "Q4_1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "Q4_1" and types["blk.0.attn_q.weight"] == "BF16"
    assert types["token_embd.weight"] == "BF16" and types["output.weight"] == "BF16"
    llm = tandem.load(out, progress=False, dtype="float32")
    assert len(llm.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True).token_ids) == 4
