"""Quantized linears on the GPU (linear.marlin) in every tiny family, against the CPU model holding the same
(dequantized) weights; KTransformers' pattern of Marlin for decode and torch for prefill agrees with itself."""

from __future__ import annotations

import pytest
from gpu_ref import RTOL, dequantized_reference, rel_err, write_rules
from tiny import FAMILIES, make_hf, save_hf

import tandem
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
