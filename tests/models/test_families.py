"""Every family against transformers on a tiny random model: logits, greedy decoding, batching."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, make_hf, save_hf

import tandem
from tandem.engine import KVCache
from tandem.models import Batch

RTOL = 1e-4  # float32 end to end; observed ~3e-7, so 1e-4 leaves room for summation-order differences


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    hf = make_hf(request.param)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, tandem.load(path, dtype="float32", progress=False)


def test_logits_match_transformers(pair):
    hf, llm = pair
    ids = torch.randint(0, hf.config.vocab_size, (32,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    got = llm.logits(ids.tolist())
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert rel_err(got, ref) <= RTOL


def test_greedy_tokens_match_transformers(pair):
    hf, llm = pair
    ids = torch.randint(0, hf.config.vocab_size, (7,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(ids[None], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = llm.generate(ids.tolist(), max_new_tokens=24)
    assert out.token_ids == ref[0, 7:].tolist()
    assert out.finish_reason == "length"


def test_batch_of_different_lengths_equals_alone(pair):
    hf, llm = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g) for n in (5, 17, 11)]
    alone = [llm.logits(p.tolist()) for p in prompts]
    cache = KVCache(num_blocks=16, block_size=4)
    tables = [[], [], []]
    for t, p in zip(tables, prompts):
        cache.grow(t, len(p) + 1)
    qlens, starts = [len(p) for p in prompts], [0, 0, 0]
    batch = Batch(qlens, starts, cache.bind(tables, starts, qlens))
    with torch.no_grad():
        ids = torch.cat(prompts)
        logits = llm.model.compute_logits(llm.model(ids, batch.positions(), batch))
    for got, ref in zip(logits.split(qlens), alone):
        assert rel_err(got, ref) <= RTOL
    # one decode step for all three, against the whole sequence scored alone
    nxt = [int(a[-1].argmax()) for a in alone]
    starts2, qlens2 = qlens, [1, 1, 1]
    batch = Batch(qlens2, starts2, cache.bind(tables, starts2, qlens2))
    with torch.no_grad():
        step = llm.model.compute_logits(llm.model(torch.tensor(nxt), batch.positions(), batch))
    for i, p in enumerate(prompts):
        ref = llm.logits(p.tolist() + [nxt[i]])[-1]
        assert rel_err(step[i], ref) <= RTOL


def test_hub_style_config_loads_the_same(tmp_path):
    hf = make_hf("deepseek_v3")
    llm = tandem.load(save_hf(hf, tmp_path, hub_style=True), dtype="float32", progress=False)
    ids = list(range(3, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert rel_err(llm.logits(ids), ref) <= RTOL
