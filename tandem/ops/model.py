"""The model-level operator: runs the decoder stack with the hidden state moved between devices, tells every
operator the batch's phase, wires the hybrid MoE blocks, and runs long prefills layer by layer on the GPU.

- `transfer_map` {layer: device} (KTransformers' KDeepseekV2Model): before that layer the hidden state (and the
  positions) move to that device; each layer's operators, and so its KV cache, live where its rule put them.
- `per_layer_prefill_intput_threshold` (KTransformers' spelling): a prefill of at least this many tokens streams
  every layer's CPU-resident experts to the GPU (tandem.gpu.transfer: a ring of slots, the first uploads queued
  before the embedding, each layer's slot refilled as soon as its compute is queued) and computes them there;
  0 turns it off; unset: chosen at the first long prefill from the measured host-to-device bandwidth and the CPU
  kernel's speed (tandem.gpu.transfer.layerwise_threshold). From tandem.gpu.prefill_gemm.DENSE_TOKENS tokens a
  streamed layer's experts are dequantized once into a workspace shared by all layers and computed with dense
  GEMMs (tandem.gpu.prefill_gemm); below that, the grouped quantized GEMM reads the blocks as they are.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from tandem.models.attention import Batch
from tandem.models.transformer import DecoderModel, SparseMoE
from tandem.ops import residual
from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors, swap_class
from tandem.ops.moe import HybridMoE, PinnedPool, hybridize, top_k_of

log = logging.getLogger(__name__)

MIN_LAYERWISE = 256  # below this many tokens no threshold is measured: the CPU is always the better choice
# the first layers' uploads queued before the embedding (a CPU embedding's gather and its copy to the GPU take
# ~3 ms for 8192 Qwen3 tokens, which the upload then overlaps); TANDEM_PREFILL_EARLY_START=0: after it
EARLY_START = os.environ.get("TANDEM_PREFILL_EARLY_START", "1") == "1"


def first_param_device(module: nn.Module, fallback: str) -> torch.device | str:
    for t in module.parameters():
        return t.device
    return fallback


class ModelOp(nn.Module):
    op_config: OpConfig
    run_state: object
    _threshold: int | None = None
    _registry = None  # tandem.gpu.transfer.HostRegistry, made at the first layer-wise prefill

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        self.run_state.phase = "prefill" if max(batch.qlens) > 1 else "generate"
        layerwise = self._layerwise(ids.shape[0]) if EARLY_START else None
        try:
            h = self.embed_tokens(ids)  # [N, D]
        except BaseException:
            if layerwise is not None:
                _close(*layerwise)
            raise
        return self.forward_layers(h, positions, batch, layerwise)

    def forward_layers(self, h: torch.Tensor, positions: torch.Tensor, batch: Batch, layerwise=None) -> torch.Tensor:
        """The layers and the final norm from hidden states [N, D] (no embedding), transfer_map applied.
        layerwise: _layerwise's (streamer, blocks) when the caller started it already."""
        transfers: dict[int, str] = self.op_config.kwargs["transfer_map"]  # effective, includes layer 0
        streamer, order = layerwise if layerwise is not None else self._layerwise(h.shape[0])
        place = {i: j for j, i in enumerate(order)}  # layer -> its index in the streamer
        pending = None  # the last layer's MLP output, added inside the next norm (tandem.ops.residual)
        try:
            for i, layer in enumerate(self.layers):
                if i in transfers:
                    h, pending = residual.settle(h, pending), None
                    h, positions = h.to(transfers[i]), positions.to(transfers[i])
                moe = order.get(i)
                if moe is not None:
                    moe.streamed, moe.workspace = streamer.take(place[i]), streamer.workspace
                if residual.fusable(layer, h):
                    h, pending = residual.layer_step(layer, h, pending, positions, batch)
                else:
                    h, pending = layer(residual.settle(h, pending), positions, batch), None
                if moe is not None:
                    moe.streamed = moe.workspace = None
                    streamer.done(place[i])  # the slot is free behind this layer: the next upload into it queued
        finally:
            _close(streamer, order)
        return residual.final_norm(self.norm, h, pending, first_param_device(self.norm, h.device))

    # ------------------------------------------------------------------ layer-wise GPU prefill

    def hybrid_layers(self) -> dict[int, HybridMoE]:
        """layer index -> its MoE block, for the layers whose routed experts run on the CPU kernel."""
        out = {}
        for i, layer in enumerate(self.layers):
            for m in layer.modules():
                if isinstance(m, HybridMoE) and m.cpu_kernel() is not None:
                    out[i] = m
        return out

    def _layerwise(self, n_tokens: int):
        """(LayerStreamer, {layer: block}) when this prefill streams experts to the GPU, else (None, {})."""
        if self.run_state.phase != "prefill" or not torch.cuda.is_available():
            return None, {}
        given = self.op_config.kwargs.get("per_layer_prefill_intput_threshold")
        if given is not None and (int(given) <= 0 or n_tokens < int(given)):
            return None, {}
        if given is None and n_tokens < MIN_LAYERWISE:
            return None, {}
        from tandem.gpu.transfer import HostRegistry, LayerStreamer, cpu_blocks

        hybrid = self.hybrid_layers()
        blocks = {i: cpu_blocks(m.experts.backends["prefill"]) for i, m in hybrid.items()}
        order = {i: hybrid[i] for i in sorted(hybrid) if blocks[i] is not None}
        if not order:
            return None, {}
        if given is None and n_tokens < self.threshold(order, blocks):
            return None, {}
        first = order[next(iter(order))]
        device = torch.device(first.op_config.generate_device)
        # one streamer, one GPU: layers placed on another GPU (transfer_map) keep their CPU experts
        order = {i: m for i, m in order.items() if torch.device(m.op_config.generate_device) == device}
        if self._registry is None:
            self._registry = HostRegistry()  # page-locked expert memory, kept for the model's later prefills
        streamer = LayerStreamer([blocks[i] for i in order], device, _act(first), self._registry)
        streamer.start()
        return streamer, order

    def threshold(self, order: dict[int, HybridMoE], blocks: dict) -> int:
        """The measured prompt length from which a layer-wise prefill is faster (once per model)."""
        if self._threshold is None:
            from tandem.gpu.transfer import layerwise_threshold, measure_cpu_tokens_per_s, measure_h2d

            i = next(iter(order))
            moe = order[i]
            h2d = measure_h2d(torch.device(moe.op_config.generate_device))
            cpu = measure_cpu_tokens_per_s(moe.experts.backends["prefill"].kernel, top_k=top_k_of(moe.gate))
            self._threshold = layerwise_threshold(blocks[i].nbytes(), h2d, cpu)
            log.info("layer-wise GPU prefill from %d tokens (host-to-device %.1f GB/s, CPU experts %.0f tok/s "
                     "per layer, %.0f MiB of experts per layer)", self._threshold, h2d / 1e9, cpu,
                     blocks[i].nbytes() / 2**20)
        return self._threshold


def _close(streamer, order: dict[int, HybridMoE]) -> None:
    """End a layer-wise prefill (also one that failed midway): blocks forget their streamed experts."""
    if streamer is not None:
        for moe in order.values():
            moe.streamed = moe.workspace = None
        streamer.close()


def _act(moe: HybridMoE):
    return getattr(moe.experts, "act", torch.nn.functional.silu)  # experts.cpu computes SiLU experts only


def wire_moe_blocks(model: nn.Module, ctx: LoadContext) -> None:
    """Every SparseMoE of the stack becomes a HybridMoE sharing one pinned pool (also those a `default` rule
    placed, which the `moe` operator's build did not see)."""
    pool = PinnedPool()
    for name, m in model.named_modules(prefix="model.layers"):
        if not isinstance(m, SparseMoE):
            continue
        if isinstance(m, HybridMoE):
            m.pool = pool
            continue
        cfg = getattr(m, "op_config", None)
        if cfg is None or not isinstance(m, DeviceOp):
            gate = m.gate
            dev = str(gate.op_config.generate_device if hasattr(gate, "op_config") else first_param_device(gate,
                                                                                                           "cpu"))
            cfg = OpConfig(name, "moe", dev, dev, dev)
        hybridize(m, cfg, ctx.state, pool)
    blocks = [m for m in model.modules() if isinstance(m, HybridMoE)]
    for cur, nxt in zip(blocks, blocks[1:]):
        cur.next_block = (nxt,)  # what a captured layer predicts and reads ahead for


def build(module: DecoderModel, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    op = swap_class(module, ModelOp, cfg, ctx)
    wire_moe_blocks(op.layers, ctx)
    return op
