"""Injecting cpu-only rules into every tiny family leaves its logits equal to the un-injected model's."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, make_hf, save_hf

import tandem
from tandem.rules import RuleError
from tandem.rules.presets import FAMILY_PRESETS

# every CPU operator at once, in tandem's own names and in KTransformers' (the model rule first: it has no kwargs
# a default rule would take from it)
ALL_OPS = r'''
- match: {name: "^model$"}
  replace: {class: ktransformers.operators.models.KDeepseekV2Model, kwargs: {transfer_map: {0: "cpu"}}}
- match: {name: "\\.experts$"}
  replace:
    class: ktransformers.operators.experts.KTransformersExperts
    kwargs: {generate_device: "cpu", generate_op: "KExpertsCPU", prefill_device: "cpu", prefill_op: "KExpertsTorch",
             out_device: "cpu"}
  recursive: false
- match: {class: torch.nn.Linear}
  replace: {class: ktransformers.operators.linear.KTransformersLinear,
            kwargs: {generate_device: "cpu", generate_op: "KLinearTorch", prefill_device: "cpu"}}
- match: {class: tandem.models.layers.RotaryEmbedding}
  replace: {class: tandem.ops.RoPE, kwargs: {generate_device: "cpu"}}
- match: {class: tandem.models.deepseek.MLAttention}
  replace: {class: tandem.ops.MLA, kwargs: {generate_device: "cpu"}}
- match: {class: tandem.models.attention.Attention}
  replace: {class: tandem.ops.Attention, kwargs: {generate_device: "cpu"}}
- match: {name: "\\.gate$"}
  replace: {class: tandem.ops.Gate, kwargs: {generate_device: "cpu"}}
- match: {class: tandem.models.layers.RMSNorm}
  replace: {class: tandem.ops.RMSNorm, kwargs: {generate_device: "cpu"}}
- match: {class: tandem.models.transformer.SparseMoE}
  replace: {class: tandem.ops.MoE, kwargs: {generate_device: "cpu"}}
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cpu", prefill_device: "cpu"}}
'''


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_dir(request, tmp_path_factory):
    return save_hf(make_hf(request.param), tmp_path_factory.mktemp(request.param))


IDS = [3, 17, 42, 7, 99, 1, 64, 12, 5, 150, 33]


@pytest.mark.parametrize("rules", ["cpu", "all-ops"])
def test_cpu_rules_keep_logits(tiny_dir, tmp_path, rules):
    ref = tandem.load(tiny_dir, dtype="float32", progress=False)
    if rules == "all-ops":
        (tmp_path / "all.yaml").write_text(ALL_OPS)
        rules = str(tmp_path / "all.yaml")
    llm = tandem.load(tiny_dir, rules=rules, dtype="float32", progress=False)
    got, want = llm.logits(IDS), ref.logits(IDS)
    # routed experts run on experts.cpu (the C++ kernel, fp32 weights here), which sums in another order than
    # torch: equal up to float32 rounding (measured ~3e-7 relative)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    # decode steps (generate phase, one token per sequence) through the KV cache as well
    assert llm.generate(IDS, max_new_tokens=6).token_ids == ref.generate(IDS, max_new_tokens=6).token_ids
    ops = {p.op for p in llm.placement.values()}
    assert "model" in ops
    if "experts" in ops:
        assert any(type(m).__name__ == "ExpertsOp" for m in llm.model.modules())


def test_preset_by_family_name(tiny_dir):
    import json

    model_type = json.loads((tiny_dir / "config.json").read_text())["model_type"]
    llm = tandem.load(tiny_dir, rules=f"{FAMILY_PRESETS[model_type]}/cpu", dtype="float32", progress=False)
    assert all(p.generate_device == "cpu" for p in llm.placement.values())


def test_gpu_rules_fail_before_loading_on_a_cpu_machine(tmp_path):
    path = save_hf(make_hf("qwen3_moe"), tmp_path / "m")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuleError, match="cuda:0 is not a device here"):
        tandem.load(path, rules="qwen3-moe/1gpu", progress=False)


def test_pending_kernel_refuses_to_load(tmp_path):
    path = save_hf(make_hf("mixtral"), tmp_path / "m")
    (tmp_path / "r.yaml").write_text(r'''
- match: {name: "\\.experts$"}
  replace: {class: KTransformersExperts, kwargs: {generate_device: "cpu", generate_op: "KExpertsMarlin"}}
  recursive: false
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cpu"}}
''')
    # validation passes only if cuda:0 is planned for; on this machine the device itself is the first error
    with pytest.raises(RuleError, match="experts.marlin cannot run on cpu"):
        tandem.load(path, rules=str(tmp_path / "r.yaml"), progress=False)
