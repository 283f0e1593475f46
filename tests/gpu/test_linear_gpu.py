"""Quantized linears on the GPU (linear.marlin) in every tiny family, against the CPU model holding the same
(dequantized) weights; KTransformers' pattern of Marlin for decode and torch for prefill agrees with itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from gpu_ref import RTOL, dequantized_reference, rel_err, write_rules
from tiny import FAMILIES, WIDE, make_hf, save_hf, to_fp8_checkpoint

import tandem
from tandem.gpu import blocks as B
from tandem.ops.linear import Linear

pytestmark = pytest.mark.gpu
IDS = [3, 17, 42, 7, 99, 1, 64, 12, 5, 150, 33]


def _rules(fmt: str | None, prefill_op: str) -> str:
    extra = f', weight_format: "{fmt}"' if fmt else ""
    return f'''
- match: {{name: "^lm_head$|kv_b_proj$"}}
  replace: {{class: default, kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0"}}}}
- match: {{class: torch.nn.Linear}}
  replace:
    class: KTransformersLinear
    kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0", generate_op: "KLinearMarlin",
             prefill_op: "{prefill_op}"{extra}}}
- match: {{name: ".*"}}
  replace: {{class: default, kwargs: {{generate_device: "cuda:0", prefill_device: "cuda:0"}}}}
'''


@pytest.mark.parametrize("fmt,prefill_op", [(None, "KLinearMarlin"), ("int8", "KLinearMarlin"),
                                             (None, "KLinearTorch")])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_with_quantized_linears_equals_cpu_reference(family, fmt, prefill_op, tmp_path):
    path = save_hf(make_hf(family), tmp_path / "m")
    llm = tandem.load(path, rules=write_rules(tmp_path, _rules(fmt, prefill_op)), dtype="float32", progress=False)
    quantized = [m for m in llm.model.modules() if isinstance(m, Linear) and m.qweight is not None]
    assert quantized and any(m.qweight.fmt in ("int4_g128", "q4_0", "q8_0p") for m in quantized)
    ref = dequantized_reference(path, llm)
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) < RTOL
    assert llm.generate(IDS, max_new_tokens=5).token_ids == ref.generate(IDS, max_new_tokens=5).token_ids


FP8_RULES = '''
- match: {name: "^model\\\\.layers\\\\..*$", class: torch.nn.Linear}
  replace:
    class: KTransformersLinear
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0", generate_op: "KLinearFP8", prefill_op: "%s"}
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
'''


@pytest.mark.parametrize("prefill_op", ["KLinearTorch", "KLinearFP8"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("fp8_file", [False, True], ids=["float-file", "fp8-file"])
def test_fp8_linears_equal_cpu_reference(family, prefill_op, fp8_file, tmp_path):
    """KTransformers' DeepSeek-V3 FP8 pattern (KLinearFP8 for decode, torch for prefill) and FP8 in both phases,
    from a float checkpoint (quantized at load) and from an FP8 one (its bytes as they are)."""
    path = save_hf(make_hf(family, **WIDE), tmp_path / "m")
    if fp8_file:
        to_fp8_checkpoint(path)
    llm = tandem.load(path, rules=write_rules(tmp_path, FP8_RULES % prefill_op), dtype="float32", progress=False)
    fp8 = [m for m in llm.model.modules() if isinstance(m, Linear) and m.qweight is not None]
    assert fp8 and all(m.qweight.fmt == B.FP8 for m in fp8)
    if fp8_file:
        from tandem.weights import SafetensorsSource

        src = SafetensorsSource.open(path)
        name = next(n for n, m in llm.model.named_modules() if m is fp8[0])
        q, _ = src.fp8(f"{name}.weight")
        assert torch.equal(fp8[0].qweight.data[:, : q.shape[1]].cpu(), q.view(torch.uint8))
    ref = dequantized_reference(path, llm)
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) < RTOL
    assert llm.generate(IDS, max_new_tokens=5).token_ids == ref.generate(IDS, max_new_tokens=5).token_ids


HYBRID_RULES = '''
- match: {name: "^model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts$"}
  replace: {class: tandem.ops.Experts, kwargs: {generate_device: "cpu", prefill_device: "cpu", out_device: "cuda:0"}}
  recursive: false
- match: {name: "^model\\\\.layers\\\\..*$", class: torch.nn.Linear}
  replace:
    class: KTransformersLinear
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0", generate_op: "KLinearFP8", prefill_op: "KLinearTorch"}
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
'''


def test_fp8_hybrid_directory(tmp_path):
    """KTransformers' FP8 + GGML hybrid: the FP8 checkpoint's attention and shared experts on linear.fp8 (bytes as
    stored), the routed experts on the CPU kernel from a GGUF's Q8_0 blocks; against the CPU model of those values
    (the kernel quantizes activations to int8: tolerance of tests/weights/test_gguf_experts.py)."""
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).parents[1] / "weights"))
    from test_gguf_experts import TOL_INT8_ACTIVATIONS, kernels
    from test_hybrid_source import hybrid_dir

    path = hybrid_dir(tmp_path)
    llm = tandem.load(path, rules=write_rules(tmp_path, HYBRID_RULES), dtype="float32", progress=False)
    fp8 = [m for m in llm.model.modules() if isinstance(m, Linear) and m.qweight is not None]
    assert fp8 and all(m.qweight.fmt == B.FP8 for m in fp8)
    assert all(k.fmt == ("int8",) * 3 and "as the GGUF file stores them" in k.describe() for k in kernels(llm))
    ref = dequantized_reference(path, llm)
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) < TOL_INT8_ACTIVATIONS
