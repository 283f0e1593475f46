"""The operator registry: every operator a rule can name, the model modules it replaces, the devices it runs on.

An operator (`experts`, `linear`, ...) replaces one module of the model tree; a backend (`experts.cpu`,
`linear.marlin`, ...) is the kernel it runs for one phase (generate_op / prefill_op). Both are looked up by
name, so a GPU backend added later (issue [E]) or the C++ experts kernel ([C]) is one `register_backend` call
and the rule layer does not change. A backend declared with `pending` is known (rules naming it validate and
explain) but refuses to load, saying which issue brings it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from torch import nn

from tandem.models.attention import Attention
from tandem.models.deepseek import MLAttention, MoEGate
from tandem.models.layers import Experts, GatedMLP, RMSNorm, RotaryEmbedding
from tandem.models.mixtral import MixtralExpert
from tandem.models.transformer import DecoderModel, SparseMoE, TopKRouter

# kwargs every operator takes; placement, not behaviour
DEVICE_KWARGS = ("generate_device", "prefill_device", "out_device", "generate_op", "prefill_op")


@dataclass(frozen=True, slots=True)
class Backend:
    name: str  # "experts.cpu"
    devices: tuple[str, ...]  # device types it runs on: "cpu", "cuda"
    impl: str = ""  # "module:attr" of its implementation, imported when a model loads
    pending: str = ""  # non-empty: declared but not implemented yet; says what brings it

    def runs_on(self, device: str) -> bool:
        return device.split(":")[0] in self.devices


@dataclass(frozen=True, slots=True)
class OpSpec:
    name: str  # "experts"
    targets: tuple[type, ...]  # model classes it replaces (isinstance); empty: any module
    target_doc: str  # what it replaces, in words, for error messages
    build: str  # "module:function" (module, OpConfig, LoadContext) -> nn.Module, imported when a model loads
    backends: tuple[str, ...] = ()  # backends it can run; the first one runnable on a device is the default
    kwargs: frozenset[str] = field(default_factory=frozenset)  # operator-specific kwargs it accepts
    isolated: bool = False  # computes on its own device and hands its result to out_device (routed experts)
    phases_apart: bool = False  # can run prefill on another device than generate (weights streamed there)

    def default_backend(self, device: str) -> str | None:
        for b in self.backends:
            if BACKENDS[b].runs_on(device) and not BACKENDS[b].pending:
                return b
        return None


OPS: dict[str, OpSpec] = {}
BACKENDS: dict[str, Backend] = {}


def register_op(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


def register_backend(backend: Backend) -> Backend:
    """Add or replace a backend (a GPU kernel from [E], the C++ experts kernel from [C])."""
    BACKENDS[backend.name] = backend
    return backend


def resolve(path: str):
    """The object named by "module:attr"."""
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


GPU_LATER = "GPU kernels arrive with issue [E]"

for _b in (
    Backend("experts.cpu", ("cpu",), "tandem.ops.experts:CpuExperts"),
    Backend("experts.torch", ("cpu", "cuda"), "tandem.ops.experts:TorchExperts"),
    Backend("experts.marlin", ("cuda",), "tandem.ops.experts_gpu:GpuExperts"),
    Backend("linear.torch", ("cpu", "cuda"), "tandem.ops.linear:torch_linear"),
    Backend("linear.marlin", ("cuda",), "tandem.ops.linear:marlin_linear"),
    Backend("linear.fp8", ("cuda",), "tandem.ops.linear:fp8_linear"),
):
    register_backend(_b)

_ANY = ("cpu", "cuda")  # the torch reference of these operators runs wherever torch does
for _spec in (
    OpSpec("experts", (Experts,), "routed experts (an Experts list)", "tandem.ops.experts:build",
           ("experts.cpu", "experts.torch", "experts.marlin"),
           frozenset({"threads", "weight_format", "group_size", "hot_experts", "hot_device", "backend", "use_mmap"}),
           isolated=True, phases_apart=True),
    OpSpec("linear", (nn.Linear,), "a linear layer (torch.nn.Linear)", "tandem.ops.linear:build",
           ("linear.torch", "linear.marlin", "linear.fp8"), frozenset({"weight_format", "group_size"}),
           phases_apart=True),
    OpSpec("mla", (MLAttention,), "multi-head latent attention (DeepSeek self_attn)", "tandem.ops.attention:build",
           kwargs=frozenset({"absorb_for_prefill", "chunk_size", "chunck_size"})),
    OpSpec("attention", (Attention,), "grouped-query attention (Llama/Qwen/Mixtral self_attn)",
           "tandem.ops.attention:build", kwargs=frozenset({"chunk_size"})),
    OpSpec("gate", (MoEGate, TopKRouter), "an MoE router (mlp.gate)", "tandem.ops.gate:build"),
    OpSpec("rope", (RotaryEmbedding,), "a rotary embedding (self_attn.rotary_emb)", "tandem.ops.rope:build"),
    OpSpec("norm", (RMSNorm,), "an RMSNorm", "tandem.ops.norm:build"),
    OpSpec("moe", (SparseMoE,), "an MoE block (mlp / block_sparse_moe)", "tandem.ops.moe:build"),
    OpSpec("mlp", (GatedMLP, MixtralExpert), "a gated MLP (dense mlp, shared expert)",
           "tandem.ops.base:build_device_op"),
    OpSpec("model", (DecoderModel,), "the decoder stack (module `model`)", "tandem.ops.model:build",
           kwargs=frozenset({"transfer_map", "per_layer_prefill_intput_threshold"})),
    OpSpec("default", (), "any module", "tandem.ops.base:build_device_op"),
):
    register_op(_spec)
