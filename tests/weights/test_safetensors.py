"""Checkpoint layouts (per-expert, fused, sharded), bad checkpoints, and load memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from tiny import make_hf, save_hf

import tandem
from tandem.weights import WeightError


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


IDS = list(range(5, 37))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_fused_expert_layout(tmp_path, family):
    """transformers 5 keeps experts fused in memory (experts.gate_up_proj [E, 2I, D]); such files load too."""
    hf = make_hf(family)
    save_hf(hf, tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    (tmp_path / "model.safetensors").unlink()
    save_file(state, tmp_path / "model.safetensors")
    llm = tandem.load(tmp_path, dtype="float32", progress=False)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    assert rel_err(llm.logits(IDS), ref) <= 1e-4


def test_sharded_with_index(tmp_path):
    hf = make_hf("qwen2_moe")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    llm = tandem.load(tmp_path, dtype="float32", progress=False)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    assert rel_err(llm.logits(IDS), ref) <= 1e-4


def test_bfloat16_load_converts_once(tmp_path):
    hf = make_hf("llama")
    llm = tandem.load(save_hf(hf, tmp_path), dtype="bfloat16", progress=False)
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    assert rel_err(llm.logits(IDS), ref) <= 5e-2  # bf16 weights and activations: ~3 significant digits


def _broken(tmp_path, edit) -> str:
    hf = make_hf("qwen3_moe")
    save_hf(hf, tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    edit(tmp_path, state)
    with pytest.raises((WeightError, ValueError, FileNotFoundError)) as e:
        tandem.load(tmp_path, dtype="float32", progress=False)
    return str(e.value)


def test_missing_tensor_is_named(tmp_path):
    def drop(path, state):
        from safetensors import safe_open
        with safe_open(path / "model.safetensors", "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.self_attn.k_norm.weight"}
        save_file(tensors, path / "model.safetensors")
    msg = _broken(tmp_path, drop)
    assert msg.startswith(f"{tmp_path}: tensor model.layers.1.self_attn.k_norm.weight") and "missing" in msg


def test_misshaped_tensor_is_named(tmp_path):
    def reshape(path, state):
        from safetensors import safe_open
        with safe_open(path / "model.safetensors", "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["model.layers.0.self_attn.q_proj.weight"] = torch.randn(7, 64)
        save_file(tensors, path / "model.safetensors")
    msg = _broken(tmp_path, reshape)
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "[7, 64]" in msg and "model.safetensors" in msg


def test_truncated_file_is_named(tmp_path):
    def truncate(path, state):
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    msg = _broken(tmp_path, truncate)
    assert "model.safetensors" in msg and "past the end" in msg


def test_garbage_file_is_named(tmp_path):
    def garbage(path, state):
        (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    msg = _broken(tmp_path, garbage)
    assert "model.safetensors" in msg and "not a safetensors file" in msg


def test_unknown_architecture(tmp_path):
    def unknown(path, state):
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    msg = _broken(tmp_path, unknown)
    assert "gpt_neox" in msg and "unknown architecture" in msg


PEAK_RSS = """
import sys, psutil
import tandem
from tandem.checkpoint import open_checkpoint
from tandem.models import build_model
build_model(open_checkpoint(sys.argv[1]).config)  # torch's one-time lazy set-up (~80 MB) is not the model's
base = psutil.Process().memory_info().rss
llm = tandem.load(sys.argv[1], dtype="float32", progress=False)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(peak - base)
"""


def test_peak_rss_under_1_3x_model_size(tmp_path):
    """A ~200 MB float32 model loads without a second copy: peak RSS growth <= 1.3 x the file."""
    from tandem.synth import synthesize

    path = synthesize("tiny-llama", tmp_path / "m", dtype="float32", progress=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, vocab_size=8192,
               num_attention_heads=8, num_key_value_heads=8)
    import tandem.synth as synth

    synth.PRESETS["test-200mb"] = cfg
    path = synthesize("test-200mb", tmp_path / "big", dtype="float32", progress=False)
    size = (path / "model.safetensors").stat().st_size
    assert size > 150e6
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip())
    assert growth <= 1.3 * size, f"peak RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
