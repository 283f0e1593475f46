"""The command line: run, synth, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem.synth import synthesize


def tandem_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthesize("tiny-deepseek-v3", tmp_path_factory.mktemp("m"), progress=False)


def test_run_prints_text_and_summary(model):
    r = tandem_cli("run", str(model), "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0.7",
                   "--seed", "1")
    assert r.returncode == 0, r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("prompt: ") and "tok/s" in summary and "decode: " in summary


def test_synth_writes_a_loadable_model(tmp_path):
    r = tandem_cli("synth", "tiny-mixtral", "--out", str(tmp_path / "m"), "--layers", "2", "--seed", "3")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["model_type"] == "mixtral"


def test_synth_fp8_writes_an_fp8_checkpoint(tmp_path):
    """--fp8: a layer's linears with whole 128-value blocks along K as float8_e4m3fn + 128 x 128 block scales (tiny
    DeepSeek-V3: the dense MLP's down_proj, K = 128), the rest in the model dtype; loads dequantized, w = q * s."""
    import torch

    import tandem
    from tandem.weights import SafetensorsSource

    r = tandem_cli("synth", "tiny-deepseek-v3", "--out", str(tmp_path / "m"), "--fp8")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    src = SafetensorsSource.open(tmp_path / "m")
    name = "model.layers.0.mlp.down_proj.weight"
    q, scale = src.fp8(name)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (64, 128) and scale.shape == (1, 1)
    assert src.fp8("model.layers.0.mlp.up_proj.weight") is None  # K = 64: no whole block, stays bf16
    w = q.float() * scale.float()
    assert torch.isfinite(w).all() and 0.5 < w.std().item() * 128**0.5 < 2  # ~ N(0, 1/fan_in), clipped tails
    assert torch.equal(src.get(name, dtype=torch.float32), w)
    llm = tandem.load(tmp_path / "m", progress=False)
    assert torch.isfinite(llm.logits([1, 2, 3])).all()


def test_synth_real_shapes_with_few_layers(tmp_path):
    """DeepSeek-V2-Lite's real per-layer shapes, one dense + one MoE layer (~1 GB in bf16 would be too slow here:
    check the header only)."""
    from tandem.models import build_model
    from tandem.synth import preset_config
    from tandem.weights.loader import tensors_of

    cfg = preset_config("deepseek-v2-lite", layers=2)
    shapes = {n: tuple(t.shape) for n, _, _, t in tensors_of(build_model(cfg))}
    assert shapes["model.layers.1.mlp.experts.63.down_proj.weight"] == (2048, 1408)
    assert shapes["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == (576, 2048)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (10944, 2048)


@pytest.mark.parametrize("case", ["no_config", "unknown_arch", "missing_tensor", "misshaped", "unreadable",
                                  "bad_preset"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, model):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    args = ["run", str(bad), "--prompt", "x"]
    if case == "no_config":
        (bad / "config.json").unlink()
        expect = "no config.json"
    elif case == "unknown_arch":
        (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
        expect = "unknown architecture"
    elif case == "missing_tensor":
        (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
        expect = f"model.layers.{cfg['num_hidden_layers']}."
    elif case == "misshaped":
        (bad / "config.json").write_text(json.dumps({**cfg, "kv_lora_rank": 32}))
        expect = "kv_a_proj_with_mqa.weight has shape"
    elif case == "unreadable":
        (bad / "model.safetensors").write_bytes(b"garbage")
        expect = "not a safetensors file"
    else:
        args = ["synth", "no-such-model", "--out", str(tmp_path / "x")]
        expect = "unknown preset"
    r = tandem_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr
