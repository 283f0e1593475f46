"""Operators against the model layers they replace, and the registry's contract for later kernels."""

from __future__ import annotations

import torch

from tandem.models.layers import Experts, GatedMLP, RotaryEmbedding
from tandem.ops import BACKENDS, OPS, Backend, register_backend
from tandem.ops.experts import TorchExperts
from tandem.ops.rope import RoPEOp
from tandem.rules.parse import parse_rules


def test_torch_experts_equal_the_model_layer():
    torch.manual_seed(0)
    experts = Experts(GatedMLP(32, 48) for _ in range(6))
    x = torch.randn(9, 32)
    ids = torch.randint(0, 6, (9, 2))
    w = torch.rand(9, 2)
    stacked = [torch.stack([getattr(e, p).weight.detach() for e in experts]) for p in experts.proj_names]
    op = TorchExperts.from_weights(*stacked, experts[0].act, "cpu")
    assert torch.equal(op.forward(x, ids, w), experts(x, ids, w))


def test_rope_tables_equal_the_model_layer_yarn():
    p = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
         "mscale": 0.707, "mscale_all_dim": 0.707}
    ref = RotaryEmbedding(64, p, 163840, interleaved=True)
    op = RotaryEmbedding(64, p, 163840, interleaved=True)
    from tandem.ops.base import LoadContext, OpConfig, swap_class

    swap_class(op, RoPEOp, OpConfig("rope", "rope"), LoadContext(None, torch.float32))
    x = torch.randn(5, 3, 64)
    pos = torch.tensor([0, 7, 4095, 5000, 9000])
    assert torch.equal(op(x, pos), ref(x, pos))


def test_every_op_declares_devices_and_targets():
    for spec in OPS.values():
        for b in spec.backends:
            assert BACKENDS[b].devices
        assert spec.name == "default" or spec.targets


def test_a_registered_gpu_kernel_needs_no_rule_change():
    """A pending backend becomes runnable by registering it; rules naming it then load."""
    rules = parse_rules('- match: {class: torch.nn.Linear}\n  replace: {class: KTransformersLinear, kwargs: '
                        '{generate_device: "cuda", generate_op: "KLinearFP8"}}\n')
    assert rules.rules[0].kwargs["generate_op"] == "linear.fp8"
    real = BACKENDS["linear.fp8"]
    assert not real.pending and real.impl == "tandem.ops.linear:fp8_linear"
    try:
        register_backend(Backend("linear.fp8", ("cuda",), pending="arrives later"))
        assert OPS["linear"].default_backend("cuda:0") == "linear.torch"  # first runnable in declared order
        register_backend(real)
        assert not BACKENDS["linear.fp8"].pending
    finally:
        register_backend(real)
