"""Continuous batching: every step runs prefill chunks of new sequences and one decode token of running ones
in a single forward pass over the flattened batch, then samples, detokenizes and retires finished sequences."""

from __future__ import annotations

import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tandem.engine.graphs import GraphRunner, model_devices
from tandem.engine.kv_cache import KVCache
from tandem.engine.sampling import apply_penalties, plain_greedy, sample
from tandem.engine.sequence import Sequence
from tandem.engine.text import TextStream
from tandem.models.attention import Batch, PagedMeta


@dataclass(slots=True)
class EngineConfig:
    max_batch: int = 8  # sequences decoded together
    kv_tokens: int = 16384  # KV cache capacity, in tokens, over all sequences
    block_size: int = 16
    prefill_chunk: int = 2048  # prompt tokens per sequence per step
    paged: bool | None = None  # batched attention over the paged cache; None: when the model runs on a GPU
    cuda_graphs: bool = True  # replay a CUDA graph per batch-size bucket for decode steps (paged, one GPU)
    # wait for a GPU step's logits asleep (a blocking CUDA event) instead of spinning in cudaStreamSynchronize:
    # a spinning main thread takes a core from the CPU experts' pool and the driver thread of their host nodes
    blocking_wait: bool = os.environ.get("TANDEM_BLOCKING_WAIT", "1") == "1"
    # greedy decode steps launched one ahead: the next step takes this step's tokens on the device and is queued
    # before the host reads them, so Python's work between steps overlaps the GPU and CPU experts. None: on a GPU
    # (TANDEM_OVERLAP=0 turns it off); True also elsewhere (tests)
    overlap: bool | None = None if os.environ.get("TANDEM_OVERLAP", "1") == "1" else False

    def __post_init__(self):
        for name in ("max_batch", "kv_tokens", "block_size", "prefill_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"engine setting {name} must be positive, got {getattr(self, name)}")


@contextmanager
def one_torch_thread(on: bool):
    """Sampling a GPU model's logits in one torch thread: torch's OpenMP team would fight the CPU experts'
    pinned pool threads (still spinning after the step) for cores, and wait time slices for them."""
    n = torch.get_num_threads()
    if on and n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if on and n > 1:
            torch.set_num_threads(n)


@dataclass(slots=True)
class Launched:
    """A greedy decode step queued on the device whose tokens the host has not read yet."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [n] on the model's device: the next step's input ids
    host: torch.Tensor  # [n] the same, copied to (pinned) host memory once `done`
    done: torch.cuda.Event | None


class Engine:
    def __init__(self, model, eos_ids: list[int], tokenizer=None, config: EngineConfig | None = None,
                 device: str | torch.device = "cpu"):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = set(eos_ids)
        self.config = config or EngineConfig()
        self.cache = KVCache(-(-self.config.kv_tokens // self.config.block_size), self.config.block_size)
        embed = model.model.embed_tokens.weight
        self.device = embed.device if embed.device.type != "meta" else torch.device(device)  # where ids go
        self.on_gpu = any(d.type == "cuda" for d in model_devices(model))
        self.paged = self.on_gpu if self.config.paged is None else self.config.paged
        self.graphs = GraphRunner(model, self.cache, self.config.max_batch) if (
            self.paged and self.config.cuda_graphs and self.on_gpu) else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.tokens_generated = 0
        self.overlap = self.on_gpu if self.config.overlap is None else self.config.overlap
        self.launched: Launched | None = None  # the step in flight when decode steps overlap
        self.overlapped = 0  # steps launched before the previous step's tokens were read (tests, benchmarks)

    # ------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence; raises ValueError if it can never fit the KV cache."""
        total = len(seq.prompt) + seq.params.max_new_tokens
        if not seq.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if self.cache.blocks_for(total) > self.cache.num_blocks:
            raise ValueError(f"prompt + max_new_tokens = {total} tokens exceed the KV cache "
                             f"({self.config.kv_tokens} tokens)")
        if self.tokenizer is not None:
            seq.stream = TextStream(self.tokenizer, seq.params.stop)
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence now and free its KV blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.cache.release(seq.block_table)
        if not seq.finished:
            seq.finish_reason = "abort"

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.launched)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[Sequence]:
        """Schedule, run, postprocess. Returns the sequences that advanced (new text or finished)."""
        if self.launched is None:
            batch_seqs, qlens = self._schedule()
            if not batch_seqs:
                return []
            if not self._overlaps(batch_seqs, qlens):
                logits = self._run(batch_seqs, qlens)
                with one_torch_thread(self.on_gpu):
                    return self._postprocess(batch_seqs, qlens, logits)
            ids = torch.tensor([s.tokens[s.cached] for s in batch_seqs], device=self.device)
            self.launched = self._launch(batch_seqs, ids, [s.cached for s in batch_seqs])
        step, self.launched = self.launched, None
        self.launched = self._launch_next(step)  # queued behind `step` before its tokens reach the host
        if step.done is not None:
            step.done.synchronize()
        with one_torch_thread(self.on_gpu):
            return self._postprocess(step.seqs, [1] * len(step.seqs), step.host)

    def _overlaps(self, seqs: list[Sequence], qlens: list[int]) -> bool:
        """Whether this batch's decode steps can be launched one ahead: decode rows only, every one plain greedy
        (the next input is the device's argmax)."""
        return self.overlap and max(qlens) == 1 and all(plain_greedy(s.params) for s in seqs)

    def _launch_next(self, step: Launched) -> Launched | None:
        """The step after `step` for the same sequences, fed its tokens on the device; None where the host must
        decide first: new requests waiting, a sequence gone or at its last token, the KV cache without room."""
        seqs = step.seqs
        if self.waiting or any(s.finished or s not in self.running for s in seqs):
            return None
        if all(len(s.output) + 1 >= s.params.max_new_tokens for s in seqs):
            return None  # every row would be thrown away
        need = sum(max(0, self.cache.blocks_for(s.cached + 2) - len(s.block_table)) for s in seqs)
        if need > len(self.cache.free):
            return None  # the synchronous path preempts
        for s in seqs:
            self.cache.grow(s.block_table, s.cached + 2)  # `step`'s token goes in at position cached + 1
        self.overlapped += 1
        # on the LM head's device; a CPU embedding copies them itself, waiting for them (a non_blocking copy into
        # host memory would hand it stale ids); a GPU one on another device gets a stream-ordered copy
        ids = step.tokens
        if self.device.type == "cuda" and ids.device != self.device:
            ids = ids.to(self.device, non_blocking=True)
        return self._launch(seqs, ids, [s.cached + 1 for s in seqs])

    @torch.inference_mode()
    def _launch(self, seqs: list[Sequence], ids: torch.Tensor, starts: list[int]) -> Launched:
        """Queue one greedy decode step (ids [n] at positions `starts`) and the copy of its tokens to the host."""
        tables = [s.block_table for s in seqs]
        hidden = self.graphs.decode(ids, tables, starts) if self.graphs is not None else None
        if hidden is None:
            hidden = self._forward(ids, tables, starts, [1] * len(seqs))
        tokens = self.model.compute_logits(hidden).argmax(-1)
        if tokens.device.type != "cuda":
            return Launched(seqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event(blocking=self.config.blocking_wait)
        done.record(torch.cuda.current_stream(tokens.device))
        return Launched(seqs, tokens, host, done)

    def _forward(self, ids: torch.Tensor, tables: list[list[int]], starts: list[int], qlens: list[int]):
        """The model's eager forward over one flattened batch -> hidden states [N, D]."""
        bound = self.cache.bind(tables, starts, qlens)
        paged = PagedMeta.build(tables, starts, qlens, self.cache.block_size) if self.paged else None
        batch = Batch(qlens, starts, bound, paged)
        return self.model(ids, batch.positions(self.device), batch)

    def _schedule(self) -> tuple[list[Sequence], list[int]]:
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            if not self.cache.can_grow(seq.block_table, min(len(seq.tokens), self.config.prefill_chunk)):
                break
            self.running.append(self.waiting.popleft())
        seqs, qlens = [], []
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted earlier in this loop
            q = min(len(seq.tokens) - seq.cached, self.config.prefill_chunk)
            while not self.cache.can_grow(seq.block_table, seq.cached + q) and self.running[-1] not in seqs:
                self._preempt(self.running[-1])  # the newest gives way, never one already in this batch
                if seq not in self.running:
                    break
            if seq in self.running and self.cache.can_grow(seq.block_table, seq.cached + q):
                self.cache.grow(seq.block_table, seq.cached + q)
                seqs.append(seq)
                qlens.append(q)
        return seqs, qlens

    def _preempt(self, seq: Sequence) -> None:
        """Out of KV blocks: the newest sequence gives its blocks back and is recomputed later."""
        self.running.remove(seq)
        self.cache.release(seq.block_table)
        seq.cached = 0
        self.waiting.appendleft(seq)

    @torch.inference_mode()
    def _run(self, seqs: list[Sequence], qlens: list[int]) -> torch.Tensor:
        starts, tables = [s.cached for s in seqs], [s.block_table for s in seqs]
        ids = torch.tensor([t for s, q in zip(seqs, qlens) for t in s.tokens[s.cached : s.cached + q]],
                           device=self.device)
        hidden = None
        if self.graphs is not None and max(qlens) == 1:
            hidden = self.graphs.decode(ids, tables, starts)  # None: this batch cannot replay a graph
        if hidden is None:
            hidden = self._forward(ids, tables, starts, qlens)
        if max(qlens) > 1:  # each sequence's last row; a decode step's rows are already one per sequence (and a
            # pageable index copied to the GPU would wait for the whole step, idling the GPU before the LM head)
            hidden = hidden[(torch.tensor(qlens).cumsum(0) - 1).to(hidden.device)]
        logits = self.model.compute_logits(hidden)  # [B, V]
        if logits.is_cuda and all(plain_greedy(s.params) for s in seqs):
            return self._to_host(logits.argmax(-1))  # [B] token ids: 8 bytes a row to the host, not the vocabulary
        return self._to_host(logits)

    def _to_host(self, logits: torch.Tensor) -> torch.Tensor:
        """A GPU step's logits (or token ids) on the host, waited for as EngineConfig.blocking_wait says."""
        if logits.device.type != "cuda" or not self.config.blocking_wait:
            return logits.cpu()
        out = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
        out.copy_(logits, non_blocking=True)
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(logits.device))
        done.synchronize()
        return out

    def _postprocess(self, seqs: list[Sequence], qlens: list[int], logits: torch.Tensor) -> list[Sequence]:
        advanced = []
        for seq, q, row in zip(seqs, qlens, logits):
            if seq.finished:
                continue  # finished (or aborted) after this step was launched: its row is thrown away
            seq.cached += q
            if seq.cached < len(seq.tokens):
                continue  # a prefill chunk, not the prompt's end
            p = seq.params
            if row.dim() == 0:  # the GPU's argmax (plain greedy)
                token = int(row)
            else:
                token = sample(apply_penalties(row.clone(), p, seq.prompt, seq.output), p, seq.generator)
            if seq.first_token_s is None:
                seq.first_token_s = time.perf_counter()
            self._append(seq, token)
            advanced.append(seq)
            if seq.finished:
                self.running.remove(seq)
                self.cache.release(seq.block_table)
        return advanced

    def _append(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if len(seq.output) >= p.max_new_tokens:  # max_new_tokens=0: the prompt only
            seq.finish_reason = "length"
            return
        is_eos = not p.ignore_eos and (token in self.eos_ids or token in p.stop_token_ids)
        if not is_eos:
            seq.output.append(token)
            self.tokens_generated += 1
            if seq.stream is not None:
                seq.pending_text += seq.stream.feed(token)
        if is_eos or (seq.stream is not None and seq.stream.stopped):
            seq.finish_reason = "stop"
        elif len(seq.output) >= p.max_new_tokens:
            seq.finish_reason = "length"
        if seq.finished and seq.stream is not None:
            seq.pending_text += seq.stream.flush()
