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
