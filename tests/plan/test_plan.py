"""tandem plan: the seed's multi-GPU cases, DeepSeek-V3 at real shapes (no files), CPU-only, too little RAM, user
rules as constraints, and the JSON the issue specifies. No GPU needed: devices are given."""

from __future__ import annotations

import json
import re
from functools import cache

import pytest
import torch
import yaml

from tandem.cli import main
from tandem.plan import PlanError, given_devices, make_plan, open_source
from tandem.plan.devices import GiB, parse_size
from tandem.plan.memory import MemoryModel
from tandem.plan.render import as_json

KEYS = {"weights", "kv", "buffers", "overhead", "total", "capacity"}


@cache
def source(name: str):
    return open_source(name)  # DeepSeek-V3's 61 layers x 256 experts build once (meta: shapes only)


def layer_devices(plan) -> list[str]:
    """Each layer's device, read back from the rule file through the rule layer (what tandem.load will do)."""
    from tandem.rules import plan as rules_plan

    pl = rules_plan(plan.source.model, plan.ruleset(), plan.source.model_type, [d.name for d in plan.devices])
    assert not pl.errors, pl.errors
    n = len(plan.source.model.model.layers)
    return [pl[f"model.layers.{i}.self_attn"].generate_device for i in range(n)]


def check_json(plan, context: int) -> dict:
    j = as_json(plan)
    assert set(j) == {"devices", "excluded", "context", "rules"}
    assert j["context"] == context
    for name, v in j["devices"].items():
        assert set(v) == KEYS, name
        assert v["total"] == v["weights"] + v["kv"] + v["buffers"] + v["overhead"]
        assert v["total"] <= v["capacity"], f"{name} over capacity"
    assert yaml.safe_load(j["rules"])  # the rule file parses
    json.dumps(j)
    return j


def contiguous(devs: list[str]) -> bool:
    seen, prev = set(), None
    for d in devs:
        if d != prev and d in seen:
            return False
        seen.add(d)
        prev = d
    return True


def test_sizes():
    assert parse_size("24GiB") == 24 * GiB and parse_size("6GB") == 6 * 10**9 and parse_size("512MiB") == 512 << 20
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("24 gigs")


def test_24gb_card_with_a_6gb_card():
    """The seed's case: the 6 GB card gets a contiguous range of layers sized to what it can hold."""
    src = source("qwen3-30b-a3b")
    plan = make_plan(src, given_devices(["24GiB", "6GiB"], "128GiB"), context=8192, prefill_chunk=512)
    j = check_json(plan, 8192)
    devs = layer_devices(plan)
    assert contiguous(devs) and set(devs) == {"cuda:0", "cuda:1"}
    assert devs.count("cuda:0") > devs.count("cuda:1") > 0  # in proportion to what each holds
    assert j["excluded"] == []
    assert j["devices"]["cuda:1"]["kv"] == devs.count("cuda:1") * MemoryModel(src, plan.workload).kv(0)


def test_two_24gb_and_two_12gb_cards():
    plan = make_plan(source("qwen3-30b-a3b"), given_devices(["24GiB", "24GiB", "12GiB", "12GiB"], "256GiB"),
                     context=8192, prefill_chunk=512)
    check_json(plan, 8192)
    devs = layer_devices(plan)
    counts = [devs.count(f"cuda:{i}") for i in range(4)]
    assert contiguous(devs) and all(counts)
    assert min(counts[:2]) > max(counts[2:])  # the 24 GB cards take more layers than the 12 GB ones


def test_a_card_too_small_for_one_layer_is_excluded():
    plan = make_plan(source("qwen3-30b-a3b"), given_devices(["24GiB", "1GiB"], "128GiB"), context=8192)
    j = check_json(plan, 8192)
    assert j["excluded"] == ["cuda:1"]
    assert j["devices"]["cuda:1"]["total"] == 0
    assert "too small for one layer" in dict(plan.excluded)["cuda:1"]
    assert set(layer_devices(plan)) == {"cuda:0"}


@pytest.mark.parametrize("context", [8192, 32768, 131072])
def test_deepseek_v3_on_one_24gb_card(context):
    """Real shapes from the synth preset (no file written): 61 layers, 256 experts of 7168 x 2048, MLA."""
    src = source("deepseek-v3")
    plan = make_plan(src, given_devices(["24GiB"], "1536GiB"), context=context)
    j = check_json(plan, context)
    mm = MemoryModel(src, plan.workload)
    devs = layer_devices(plan)
    on_gpu = devs.count("cuda:0")
    assert contiguous(devs)
    # the MLA cache: (kv_lora_rank 512 + rope 64) x 2 bytes per token and layer
    assert mm.kv(0) == 576 * 2 * mm.rows and mm.rows >= context
    assert j["devices"]["cuda:0"]["kv"] == on_gpu * mm.kv(0)
    assert j["devices"]["cpu"]["weights"] >= 58 * 256 * 3 * 7168 * 2048 * 2 * 0.9  # routed experts in RAM
    if on_gpu:
        assert j["devices"]["cuda:0"]["weights"] >= on_gpu * 0.4e9  # attention + shared expert per layer


def test_deepseek_v3_context_is_the_largest_that_fits_when_not_given():
    src = source("deepseek-v3")
    plan = make_plan(src, given_devices(["80GiB"], "1536GiB"), context=None)
    ctx = plan.workload.context
    check_json(plan, ctx)
    assert 0 < ctx <= 163840 and any("largest that fits" in n for n in plan.notes)


def test_cpu_only():
    src = source("qwen3-30b-a3b")
    plan = make_plan(src, given_devices([], "128GiB"), context=4096)
    j = check_json(plan, 4096)
    assert list(j["devices"]) == ["cpu"] and j["excluded"] == []
    assert set(layer_devices(plan)) == {"cpu"}
    assert "cuda" not in j["rules"]


def test_ram_budget_too_small_is_one_clear_line():
    with pytest.raises(PlanError) as e:
        make_plan(source("deepseek-v3"), given_devices(["24GiB"], "128GiB"), context=8192)
    msg = str(e.value)
    assert "\n" not in msg
    assert "does not fit at context 8192" in msg and "cpu needs" in msg
    assert re.search(r"--ram \d+\.\d+GiB", msg) and "4-bit format" in msg


def test_cli_bad_ram_and_gpu_sizes_exit_2(capsys):
    assert main(["plan", "tiny-qwen3-moe", "--gpu", "lots", "--ram", "8GiB"]) == 2
    assert "--gpu 'lots' is not a size" in capsys.readouterr().err
    assert main(["plan", "deepseek-v3", "--layers", "4", "--gpu", "24GiB", "--ram", "16GiB", "--context", "8192"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "What would fit" in err


USER_RULES = """# my rules: the first four layers on the small card
- match:
    name: "^model\\\\.layers\\\\."
    layers: "0:4"
  replace:
    class: default
    kwargs:
      generate_device: "cuda:1"
      prefill_device: "cuda:1"
"""


def test_user_rule_is_pinned_and_the_plan_fills_around_it(tmp_path):
    rules = tmp_path / "mine.yaml"
    rules.write_text(USER_RULES)
    src = source("qwen3-30b-a3b")
    plan = make_plan(src, given_devices(["24GiB", "24GiB"], "128GiB"), context=8192, prefill_chunk=512,
                     rules=str(rules))
    check_json(plan, 8192)
    assert plan.rules.split("# planned by tandem plan around")[0].endswith(USER_RULES)  # verbatim, first
    devs = layer_devices(plan)
    assert devs[:4] == ["cuda:1"] * 4
    assert set(devs[4:]) <= {"cuda:0", "cuda:1"} and "cuda:0" in devs[4:]


def test_user_rule_that_cannot_fit_is_a_clear_error(tmp_path):
    rules = tmp_path / "greedy.yaml"
    rules.write_text("""- match:
    name: "^model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts$"
  replace:
    class: tandem.ops.Experts
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0", out_device: "cuda:0"}
  recursive: false
""")
    with pytest.raises(PlanError) as e:
        make_plan(source("qwen3-30b-a3b"), given_devices(["24GiB"], "128GiB"), context=4096, rules=str(rules))
    msg = str(e.value)
    assert "cuda:0 needs" in msg and "your rules put parts there" in msg and "greedy.yaml: rule 0" in msg


def test_user_rules_that_contradict_themselves(tmp_path):
    rules = tmp_path / "both.yaml"
    rules.write_text("""- match: {name: "^model\\\\.layers\\\\.2\\\\.self_attn$"}
  replace: {class: default, kwargs: {generate_device: "cuda:0"}}
- match: {name: "^model\\\\.layers\\\\.2\\\\.mlp$"}
  replace: {class: default, kwargs: {generate_device: "cuda:1"}}
""")
    with pytest.raises(PlanError, match="a layer runs on one device"):
        make_plan(source("qwen3-30b-a3b"), given_devices(["24GiB", "24GiB"], "128GiB"), context=4096,
                  rules=str(rules))


def test_cli_json_is_exactly_the_issues(capsys):
    assert main(["plan", "tiny-qwen3-moe", "--gpu", "1GiB", "--ram", "8GiB", "--context", "1024", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert set(j) == {"devices", "excluded", "context", "rules"} and j["context"] == 1024
    assert set(j["devices"]) == {"cuda:0", "cpu"} and all(set(v) == KEYS for v in j["devices"].values())


FP8_ATTENTION = """- match:
    name: "^model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|o_proj)$"
    class: torch.nn.Linear
  replace:
    class: tandem.ops.Linear
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0", generate_op: linear.fp8, prefill_op: linear.fp8}
- match:
    name: "^model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.kv_b_proj$"
    class: torch.nn.Linear
  replace:
    class: tandem.ops.Linear
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0", generate_op: linear.marlin, weight_format: q8_0}
"""


def test_user_quantized_linears_count_in_their_format(tmp_path):
    """Linears the user's rules put on linear.fp8 / linear.marlin count in the bytes those hold (FP8 rows with their
    block scales, Q8_0 blocks), not in the model dtype: DeepSeek-V3's attention at real shapes."""
    from tandem.gpu import blocks as B
    from tandem.plan.memory import Workload
    from tandem.plan.planner import constraints

    rules = tmp_path / "fp8.yaml"
    rules.write_text(FP8_ATTENTION)
    src = source("deepseek-v3")
    cons, _ = constraints(src, str(rules), given_devices(["80GiB"], "512GiB"))
    attn = src.model.model.layers[3].self_attn
    formats = {"q_a_proj": B.FP8, "q_b_proj": B.FP8, "kv_a_proj_with_mqa": B.FP8, "o_proj": B.FP8, "kv_b_proj": "q8_0"}
    linears = {n: getattr(attn, n) for n in formats}
    want = {f"model.layers.3.self_attn.{n}": m.out_features * B.row_bytes(formats[n], m.in_features)
            for n, m in linears.items()}
    assert {n: b for n, b in cons.resident.items() if n.startswith("model.layers.3.")} == want
    w = Workload(4096, 1, 512, torch.bfloat16, torch.bfloat16)
    bf16 = sum(2 * m.weight.numel() for m in linears.values())
    plain, held = MemoryModel(src, w).layers[3], MemoryModel(src, w, resident=cons.resident).layers[3]
    assert plain.core - held.core == bf16 - sum(want.values())
    assert held.experts == plain.experts and held.experts_cpu == plain.experts_cpu
    assert 0.45 < (plain.core - held.core) / bf16 < 0.5  # 8 bits and a scale per 128 x 128 (or per 32) vs 16 bits


def test_user_quantized_linear_with_a_wrong_format_is_one_line(tmp_path):
    from tandem.plan.planner import constraints

    rules = tmp_path / "bad.yaml"
    rules.write_text(FP8_ATTENTION.replace("generate_op: linear.fp8, prefill_op: linear.fp8",
                                           "generate_op: linear.fp8, prefill_op: linear.fp8, weight_format: int4"))
    with pytest.raises(PlanError, match=r"bad.yaml: rule 0.*linear.fp8 holds FP8 E4M3 weights"):
        constraints(source("deepseek-v3"), str(rules), given_devices(["80GiB"], "512GiB"))
