"""GPU tests: marked `gpu` (make test-gpu), skipped where torch sees no CUDA device; shared helpers as fixtures."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, make_hf, save_hf

from tandem.engine import KVCache
from tandem.models.attention import Batch, PagedMeta


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def save_family(name: str, path):
    """tiny.FAMILIES[name] saved at `path`; "<family>_dense": that DeepSeek family with dense MLPs only (MLA
    without routing, whose top-k flips in bf16 and whose reference experts cannot be captured)."""
    with pytest.MonkeyPatch.context() as mp:
        if name.endswith("_dense"):
            cfg, cls, kw = FAMILIES[name.removesuffix("_dense")]
            mp.setitem(FAMILIES, name, (cfg, cls, dict(kw, first_k_dense_replace=kw["num_hidden_layers"])))
        return save_hf(make_hf(name), path)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def paged_logits(model, prompts: list[torch.Tensor], chunks, block_size: int = 4, absorb: bool = False):
    """Score `prompts` through the paged path in prefill chunks (lo, hi): (cache, tables, logits per chunk)."""
    for m in model.modules():
        if hasattr(m, "absorb_for_prefill"):
            m.absorb_for_prefill = absorb
    dev = model.model.embed_tokens.weight.device
    cache, tables, outs = KVCache(num_blocks=64, block_size=block_size), [[] for _ in prompts], []
    for t, p in zip(tables, prompts):
        cache.grow(t, len(p) + 2)
    for lo, hi in chunks:
        starts, qlens = [min(lo, len(p)) for p in prompts], [len(p[lo:hi]) for p in prompts]
        meta = PagedMeta.build(tables, starts, qlens, block_size)
        b = Batch(qlens, starts, cache.bind(tables, starts, qlens), meta)
        with torch.inference_mode():
            ids = torch.cat([p[lo:hi] for p in prompts]).to(dev)
            outs.append(model.compute_logits(model(ids, b.positions(dev), b)).cpu().split(qlens))
    return cache, tables, outs


@pytest.fixture(scope="session")
def helpers():
    class H:
        pass

    H.rel_err, H.paged_logits, H.save_family = staticmethod(rel_err), staticmethod(paged_logits), staticmethod(
        save_family)
    return H
