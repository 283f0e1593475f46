"""A model directory with an FP8 safetensors checkpoint and a GGUF quant of the same model (KTransformers' FP8 +
GGML hybrid): routed experts come from the GGUF's blocks, everything else from the safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402
from test_gguf_experts import TOL_INT8_ACTIVATIONS, kernels  # noqa: E402
from test_gguf_model import rel_err, write_gguf  # noqa: E402
from tiny import WIDE, make_hf, save_hf, to_fp8_checkpoint  # noqa: E402

import tandem  # noqa: E402
from tandem.checkpoint import open_checkpoint  # noqa: E402
from tandem.models.base import ConfigError  # noqa: E402
from tandem.weights import SafetensorsSource  # noqa: E402
from tandem.weights.gguf import open_gguf_source  # noqa: E402
from tandem.weights.hybrid import HybridSource  # noqa: E402

EXPERT = "model.layers.1.mlp.experts.2.gate_proj.weight"
LINEAR = "model.layers.1.self_attn.q_b_proj.weight"
SHARED = "model.layers.1.mlp.shared_experts.up_proj.weight"


def q8_experts(name, a):
    """Routed experts in Q8_0, every other tensor float32 (so the GGUF's linears differ from the FP8 ones)."""
    if ".experts." not in name:
        return None
    return ref_quantize(a.reshape(-1, a.shape[-1]), T.Q8_0).reshape(*a.shape[:-1], -1), T.Q8_0


def hybrid_dir(tmp_path, **overrides):
    hf = make_hf("deepseek_v3", **WIDE)
    path = to_fp8_checkpoint(save_hf(hf, tmp_path / "m"))
    other = make_hf("deepseek_v3", **{**WIDE, **overrides}) if overrides else hf
    write_gguf(other, path / "experts-Q8_0.gguf", "deepseek_v3", quant=q8_experts)
    return path


def test_routed_experts_from_the_gguf_the_rest_from_safetensors(tmp_path):
    path = hybrid_dir(tmp_path)
    src = open_checkpoint(path).source
    assert isinstance(src, HybridSource)
    st, (_, gg, _) = SafetensorsSource.open(path), open_gguf_source(path / "experts-Q8_0.gguf")
    stacked = "model.layers.1.mlp.experts.gate_proj"  # [E, I, H] in the GGUF, split per expert by the loader
    assert EXPERT not in src and stacked in src and EXPERT in st
    expert = src.view(stacked)[2]
    assert torch.equal(expert, gg.view(stacked)[2]) and not torch.equal(expert, st.get(EXPERT))
    for name in (LINEAR, SHARED):
        assert torch.equal(src.get(name), st.get(name)) and src.fp8(name) is not None
    with pytest.raises(ValueError, match="comes from the safetensors"):
        src.raw(LINEAR)
    assert src.raw("model.layers.1.mlp.experts.gate_proj")[0] == int(T.Q8_0)

    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = tandem.load(path, rules="none", dtype="float32", progress=False)  # the same values, all in torch
    llm = tandem.load(path, dtype="float32", progress=False)  # routed experts on the CPU kernel
    ks = kernels(llm)
    assert ks and all(k.fmt == ("int8",) * 3 and "as the GGUF file stores them" in k.describe() for k in ks)
    assert rel_err(llm.logits(ids), ref.logits(ids)) <= TOL_INT8_ACTIVATIONS
    fp8_only = tandem.load(to_fp8_checkpoint(save_hf(make_hf("deepseek_v3", **WIDE), tmp_path / "f")),
                           rules="none", dtype="float32", progress=False)
    assert rel_err(fp8_only.logits(ids), ref.logits(ids)) > 1e-3  # the experts did come from the GGUF


def test_a_gguf_of_another_model_is_refused(tmp_path):
    path = hybrid_dir(tmp_path, moe_intermediate_size=64)
    with pytest.raises(ConfigError, match=r"experts-Q8_0.gguf: moe_intermediate_size 64, but .*config.json says 128"):
        open_checkpoint(path)


def test_a_gguf_of_another_family_is_refused(tmp_path):
    """Shapes alone would match: a Qwen3-MoE GGUF with DeepSeek's hidden size, depth and expert size."""
    hf = make_hf("deepseek_v3", **WIDE)
    path = to_fp8_checkpoint(save_hf(hf, tmp_path / "m"))
    c = hf.config
    qwen = make_hf("qwen3_moe", hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                   moe_intermediate_size=c.moe_intermediate_size)
    write_gguf(qwen, path / "experts-Q8_0.gguf", "qwen3_moe", quant=q8_experts)
    with pytest.raises(ConfigError, match=r"experts-Q8_0.gguf: a qwen3_moe model, but .*config.json says deepseek_v3"):
        open_checkpoint(path)


def test_two_gguf_models_in_one_directory_are_refused(tmp_path):
    path = hybrid_dir(tmp_path)
    (path / "other.gguf").write_bytes((path / "experts-Q8_0.gguf").read_bytes())
    with pytest.raises(ConfigError, match="several GGUF models here"):
        open_checkpoint(path)


def test_plan_counts_the_gguf_experts(tmp_path):
    """tandem plan sees the routed experts as the GGUF's Q8_0 blocks, the rest as the safetensors store it."""
    from tandem.plan.source import open_source

    path = hybrid_dir(tmp_path)
    src = open_source(str(path))
    assert src.kind == "hybrid"
    q8 = src.tensors["model.layers.1.mlp.experts.gate_proj"]
    assert q8.format == "Q8_0" and EXPERT not in src.tensors
    assert src.tensors[LINEAR].format == "F8_E4M3" and LINEAR + "_scale_inv" in src.tensors


def test_embeddings_come_from_the_safetensors(tmp_path):
    """Embeddings come from the safetensors, bit for bit (the GGUF holds them too, as float32)."""
    path = hybrid_dir(tmp_path)
    src = open_checkpoint(path).source
    emb = src.get("model.embed_tokens.weight")
    assert torch.equal(emb, SafetensorsSource.open(path).get("model.embed_tokens.weight"))
    assert np.isfinite(emb.numpy()).all()
