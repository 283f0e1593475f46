"""Rule files through `tandem rules explain --json`: the seeds' files verbatim and every KTransformers file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from configs import DEEPSEEK_V2_CHAT, FOR_FILE  # noqa: E402

from tandem.cli import main  # noqa: E402

DATA = Path(__file__).parent / "data"
KT_FILES = sorted(p.name for p in DATA.glob("*.yaml"))
THREE = "cpu,cuda:0,cuda:1"


def explain_json(capsys, tmp_path: Path, config: dict, rules_text: str, devices: str = THREE):
    (tmp_path / "config.json").write_text(json.dumps(config))
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    rc = main(["rules", "explain", str(tmp_path), "--rules", str(rules), "--json", "--devices", devices])
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


def by_name(report: dict) -> dict[str, dict]:
    return {m["module"]: m for m in report["modules"]}


def half(i: int) -> str:
    return "cuda:0" if i < 30 else "cuda:1"


# the Marlin rule of the multi-GPU tutorial (seeds/000), verbatim: "Add new rule before old rule."
SEED_MARLIN_RULE = '''- match:
    name: "^model\\\\.layers\\\\.([4-8])\\\\.mlp\\\\.experts$" # inject experts in layer 4~8 as marlin expert
  replace:
    class: ktransformers.operators.experts.KTransformersExperts
    kwargs:
      generate_device: "cuda:0"
      generate_op:  "KExpertsMarlin"
  recursive: False

'''


def test_seed_multi_gpu_transfer_map(capsys, tmp_path):
    """seeds/000: 60 layers on two GPUs, the hidden state moving to cuda:1 at layer 30, experts on the CPU."""
    rc, report, err = explain_json(capsys, tmp_path, DEEPSEEK_V2_CHAT,
                                   (DATA / "DeepSeek-V2-Chat-multi-gpu.yaml").read_text())
    assert rc == 0, err
    assert report["transfer_map"] == {"30": "cuda:1"}
    m = by_name(report)
    assert m["model"]["class"] == "model" and m["model"]["rule"] == 11
    for i in range(60):
        attn = m[f"model.layers.{i}.self_attn"]
        assert (attn["class"], attn["generate_device"], attn["rule"]) == ("mla", half(i), 9 if i < 30 else 10)
        assert m[f"model.layers.{i}.input_layernorm"]["generate_device"] == half(i)
        if i == 0:  # first_k_dense_replace: a dense MLP, no experts
            assert "model.layers.0.mlp.experts" not in m
            continue
        ex = m[f"model.layers.{i}.mlp.experts"]
        assert ex["class"] == "experts" and ex["rule"] == (7 if i < 30 else 8)
        assert (ex["generate_device"], ex["generate_op"], ex["out_device"]) == ("cpu", "experts.cpu", half(i))
        assert (ex["prefill_device"], ex["prefill_op"]) == (half(i), "experts.torch")
        assert f"model.layers.{i}.mlp.experts.0" not in m  # recursive: False
        assert m[f"model.layers.{i}.mlp"]["class"] == "moe"
    assert m["model.embed_tokens"]["generate_device"] == "cpu"
    assert m["model.norm"]["generate_device"] == "cuda:1"
    assert (m["lm_head"]["class"], m["lm_head"]["generate_device"], m["lm_head"]["generate_op"]) == (
        "linear", "cuda:1", "linear.marlin")
    assert m["model.layers.3.self_attn.kv_b_proj"]["class"] == "default"  # the (?!self_attn\.kv_b_proj) look-ahead
    assert m["model.layers.3.self_attn.q_a_proj"]["class"] == "linear"
    b = report["bytes"]
    assert b["cpu"]["weights"] > 8 * (b["cuda:0"]["weights"] + b["cuda:1"]["weights"])  # routed experts
    assert b["cpu"]["kv"] == 0 and b["cuda:0"]["kv"] == b["cuda:1"]["kv"] > 0


def test_marlin_linears_count_in_their_blocks(capsys, tmp_path):
    """seeds/000 runs the layers' linears on KLinearMarlin: each device's weights count those in int4_g128 blocks
    (the default format where rows are whole 128-value groups), the same file on KLinearTorch in the model dtype."""
    import torch

    from tandem.gpu import blocks as B
    from tandem.rules.explain import _model

    text = (DATA / "DeepSeek-V2-Chat-multi-gpu.yaml").read_text()
    rc, marlin, err = explain_json(capsys, tmp_path, DEEPSEEK_V2_CHAT, text)
    assert rc == 0, err
    plain = text.replace("KLinearMarlin", "KLinearTorch")
    rc, torch_only, err = explain_json(capsys, tmp_path, DEEPSEEK_V2_CHAT, plain)
    assert rc == 0, err
    model = _model(json.dumps(DEEPSEEK_V2_CHAT, sort_keys=True))
    saved = {"cuda:0": 0, "cuda:1": 0, "cpu": 0}
    for m in marlin["modules"]:
        if "linear.marlin" in (m["generate_op"], m["prefill_op"]):
            lin = model.get_submodule(m["module"])
            assert isinstance(lin, torch.nn.Linear) and lin.in_features % 128 == 0
            held = lin.out_features * B.row_bytes("int4_g128", lin.in_features)
            saved[m["generate_device"]] += 2 * lin.weight.numel() - held  # bf16: the config's torch_dtype
    assert saved["cuda:0"] > 0 and saved["cuda:1"] > 0
    for dev, n in saved.items():
        assert torch_only["bytes"][dev]["weights"] - marlin["bytes"][dev]["weights"] == n, dev


def test_seed_marlin_rule_ahead_of_cpu_rule(capsys, tmp_path):
    """seeds/000: layers 4-8's experts on cuda:0 with Marlin, because that rule comes first."""
    text = (DATA / "DeepSeek-V2-Chat-multi-gpu.yaml").read_text()
    cpu_rule = '- match:\n    name: "^model\\\\.layers\\\\.(0|[1-9]|[12][0-9])\\\\.mlp\\\\.experts$"'
    assert cpu_rule in text
    text = text.replace(cpu_rule, SEED_MARLIN_RULE + cpu_rule)
    rc, report, err = explain_json(capsys, tmp_path, DEEPSEEK_V2_CHAT, text)
    assert rc == 0, err
    m = by_name(report)
    for i in range(1, 60):
        ex = m[f"model.layers.{i}.mlp.experts"]
        if 4 <= i <= 8:
            assert (ex["rule"], ex["generate_device"], ex["generate_op"]) == (7, "cuda:0", "experts.marlin")
            assert ex["out_device"] == "cuda:0"
        else:
            assert (ex["generate_device"], ex["generate_op"], ex["out_device"]) == ("cpu", "experts.cpu", half(i))
            assert ex["rule"] == (8 if i < 30 else 9)
    assert report["transfer_map"] == {"30": "cuda:1"}


# seeds/002 (the 30/30 CPU/GPU split article), its rules in the article's order, verbatim
SEED_SPLIT = '''- match:
    name: "^model\\\\.layers\\\\.(0|[1-9]|[12][0-9])\\\\."
  replace:
    class: "default"
    kwargs:
      generate_device: "cpu"
      prefill_device: "cpu"
- match:
    name: "(^model\\\\.layers\\\\.([3456][0-9])\\\\.)|(model.norm)|(lm_head)"
  replace:
    class: "default"
    kwargs:
      generate_device: "cuda:0"
      prefill_device: "cuda:0"
- match:
    name: "^model.embed_tokens"
  replace:
    class: "default"
    kwargs:
      generate_device: "cpu"
      prefill_device: "cpu"
- match:
    name: "^model\\\\.layers\\\\.(0|[1-9]|[12][0-9])\\\\."
    class: DeepseekV3RotaryEmbedding
  replace:
    class: YarnRotaryEmbeddingV3
    kwargs:
      generate_device: "cpu"
      prefill_device: "cpu"
- match:
    name: "^model\\\\.layers\\\\.([3456][0-9])\\\\.self_attn$"
  replace:
    class: KDeepseekV2Attention
    kwargs:
      generate_device: "cuda:0"
      prefill_device: "cuda:0"
- match:
    name: "^model\\\\.layers\\\\.(0|[1-9]|[12][0-9])\\\\.mlp\\\\.experts$"
  replace:
    class: KTransformersExperts
    kwargs:
      prefill_device: "cpu"
      prefill_op: "KExpertsTorch"
      generate_device: "cpu"
      generate_op: "KExpertsCPU"
      out_device: "cuda:0"
'''


def test_seed_cpu_gpu_split(capsys, tmp_path):
    """seeds/002: layers 0-29 on the CPU, 30-59 plus norm and lm_head on the GPU, embeddings on the CPU.

    In the article's order the first two rules take every layer module, so its later rules place nothing:
    explain says so, rule by rule (the first matching rule wins, as in KTransformers).
    """
    rc, report, err = explain_json(capsys, tmp_path, DEEPSEEK_V2_CHAT, SEED_SPLIT, "cpu,cuda:0")
    assert rc == 0, err
    m = by_name(report)
    for name, p in m.items():
        if name.startswith("model.layers.") and name.count(".") > 2:
            i = int(name.split(".")[2])
            assert (p["rule"], p["generate_device"], p["prefill_device"]) == (
                (0, "cpu", "cpu") if i < 30 else (1, "cuda:0", "cuda:0")), name
    assert m["model.norm"]["generate_device"] == m["lm_head"]["generate_device"] == "cuda:0"
    assert (m["model.embed_tokens"]["rule"], m["model.embed_tokens"]["generate_device"]) == (2, "cpu")
    assert report["transfer_map"] == {"30": "cuda:0"}  # inferred: the layers change device there
    warnings = "\n".join(report["warnings"])
    assert "transfer_map: {30: \"cuda:0\"}" in warnings
    assert "rule 3 (line 22): matches no module: rule 0 (line 1) took every module it matches first" in warnings
    assert "rule 4 (line 30): matches no module: rule 1 (line 8)" in warnings
    assert "rule 5 (line 37): matches no module: rule 0 (line 1)" in warnings


@pytest.mark.parametrize("name", KT_FILES)
def test_ktransformers_file_explains(capsys, tmp_path, name):
    rc, report, err = explain_json(capsys, tmp_path, FOR_FILE.get(name, DEEPSEEK_V2_CHAT), (DATA / name).read_text())
    assert rc == 0, err
    assert not report["errors"]
    m = by_name(report)
    experts = [p for n, p in m.items() if n.endswith(".experts")]
    assert experts and all(p["class"] == "experts" for p in experts)
    on_cpu = [p for p in experts if p["generate_device"] == "cpu"]
    assert len(on_cpu) >= len(experts) - 6  # the Marlin file puts a few layers' experts on the GPUs
    attn = [p for n, p in m.items() if n.endswith("self_attn")]
    assert attn and all(p["generate_device"].startswith("cuda") for p in attn)


def test_kt_files_are_the_shared_ones():
    shared = Path(__file__).parents[3] / "shared" / "kt-rules"
    if not shared.is_dir():
        pytest.skip("../shared/kt-rules is not beside the repository")
    for f in shared.glob("*.yaml"):
        assert (DATA / f.name).read_text() == f.read_text(), f.name


def test_human_table_folds_layers(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V2_CHAT))
    rc = main(["rules", "explain", str(tmp_path), "--rules", str(DATA / "DeepSeek-V2-Chat-multi-gpu.yaml"),
               "--devices", THREE])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model.layers.{30-59}.mlp.experts" in out and "layer 30 -> cuda:1" in out
    assert len(out.splitlines()) < 80


def test_presets_list_and_explain(capsys, tmp_path):
    assert main(["rules", "list"]) == 0
    listed = capsys.readouterr().out
    for fam in ("llama", "mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3"):
        for name in ("cpu", "1gpu", "2gpu"):
            assert f"{fam}/{name}" in listed
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V2_CHAT))
    assert main(["rules", "explain", str(tmp_path), "--rules", "deepseek-v2/2gpu", "--json", "--devices", THREE]) == 0
    report = json.loads(capsys.readouterr().out)
    m = by_name(report)
    assert report["transfer_map"] == {"30": "cuda:1"}
    assert m["model.layers.29.self_attn"]["generate_device"] == "cuda:0"
    assert m["model.layers.30.self_attn"]["generate_device"] == "cuda:1"
    assert (m["model.layers.45.mlp.experts"]["generate_device"], m["model.layers.45.mlp.experts"]["out_device"]) == (
        "cpu", "cuda:1")
    assert main(["rules", "explain", str(tmp_path), "--rules", "1gpu", "--json", "--devices", "cpu,cuda:0"]) == 0
    m = by_name(json.loads(capsys.readouterr().out))
    assert m["model.layers.7.mlp.experts"]["out_device"] == "cuda:0"
    assert m["model.layers.7.self_attn"]["generate_device"] == "cuda:0"
