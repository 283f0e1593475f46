"""The public object: `tandem.load(path)` -> LLM with logits, generate, chat, tokenizer, placement."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.checkpoint import open_checkpoint
from tandem.engine import Engine, EngineConfig, SamplingParams, Sequence
from tandem.models import Batch, CausalLM, build_model
from tandem.models.layers import Experts
from tandem.tokenize.tokenizer import Tokenizer
from tandem.weights import materialize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(slots=True)
class Placement:
    """Where one module runs and with which operator."""

    op: str
    generate_device: str
    prefill_device: str


@dataclass(slots=True)
class Generation:
    text: str
    token_ids: list[int]  # new tokens only (an end-of-sequence token is not included)
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def summary(self) -> str:
        pre = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        dec = (len(self.token_ids) - 1) / self.decode_s if self.decode_s and len(self.token_ids) > 1 else 0.0
        return (f"prompt: {self.prompt_tokens} tokens, {pre:.1f} tok/s | "
                f"decode: {len(self.token_ids)} tokens, {dec:.1f} tok/s | finish: {self.finish_reason}")


def parse_dtype(dtype: str | torch.dtype | None, config: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


class LLM:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, config: dict, eos_ids: list[int],
                 placement: dict[str, Placement], engine_config: EngineConfig | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos_ids = eos_ids
        self.placement = placement
        self.engine = Engine(model, eos_ids, tokenizer, engine_config)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """float32 logits [len(ids), vocab] for the whole prompt, no cache reuse."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("logits() needs at least one token id")
        batch = Batch.single(ids.numel())
        ids = ids.to(self.engine.device)  # where the embedding lives
        return self.model.compute_logits(self.model(ids, batch.positions(ids.device), batch)).cpu()

    # ------------------------------------------------------------------ generation

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (no tokenizer.json): pass token ids, not text")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        vocab = self.model.args.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: list[str] | str | None = None, seed: int | None = None,
                 stream: bool = False, **sampling) -> Generation | Iterator[str]:
        """Continue `prompt` (text or ids). stream=True yields text pieces (whole UTF-8 characters)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=[stop] if isinstance(stop, str) else list(stop or []), seed=seed, **sampling)
        seq = Sequence(self.encode_prompt(prompt), params)
        if stream:
            return self._stream(seq)
        start = time.perf_counter()
        for _ in self._steps(seq):
            pass
        return self._result(seq, start)

    def chat(self, messages: list[dict], **kwargs) -> Generation | Iterator[str]:
        """`generate` on the prompt the model's chat template makes of `messages`."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot chat: pass token ids to generate()")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(self.tokenizer.encode(text, add_special_tokens=False), **kwargs)

    def _steps(self, seq: Sequence) -> Iterator[str]:
        with self._lock:
            self.engine.add(seq)
            try:
                while not seq.finished:
                    self.engine.step()
                    if seq.pending_text:
                        yield seq.take_text()
            finally:
                if not seq.finished:
                    self.engine.abort(seq)

    def _stream(self, seq: Sequence) -> Iterator[str]:
        yield from self._steps(seq)

    def _result(self, seq: Sequence, start: float) -> Generation:
        end = time.perf_counter()
        first = seq.first_token_s or end
        text = seq.stream.text if seq.stream is not None else ""
        return Generation(text, list(seq.output), seq.finish_reason or "length", len(seq.prompt),
                          first - start, end - first)


def load(path: str | Path, rules: str | None = None, dtype: str | torch.dtype | None = None,
         device: str = "cpu", engine_config: EngineConfig | None = None, progress: bool = True,
         cuda_graphs: bool | None = None) -> LLM:
    """Load a model (a Hugging Face directory) and return an LLM ready to generate.

    rules: None (everything on `device`; on the CPU an MoE's routed experts run on the C++ experts kernel, the
    family's "cpu" preset), "none" (everything on `device` in torch: the reference), a rule file (YAML), a preset
    name ("deepseek-v3/1gpu", see `tandem rules list`; "cpu" / "1gpu" / "2gpu" alone: the model family's), or
    "auto" (planned for this machine's devices by tandem.plan; engine_config, if given, is the workload it plans
    for).
    Rules are validated before any weight is read.
    cuda_graphs: False decodes eagerly on a GPU (default: engine_config's, on; see tandem/engine/graphs.py).
    """
    if cuda_graphs is not None:
        engine_config = dataclasses.replace(engine_config or EngineConfig(), cuda_graphs=cuda_graphs)
    ckpt = open_checkpoint(path)
    model = build_model(ckpt.config)  # on the meta device: shapes only, no weight read
    ruleset = plan = None
    if rules == "auto":
        from tandem.plan.auto import describe, plan_for_load

        # planned for this machine's devices; a request that cannot fit fails here, saying what would
        plan, engine_config = plan_for_load(path, dtype, engine_config)
        ruleset = plan.ruleset()
        logging.getLogger("tandem.plan").info("%s", describe(plan))
    elif rules is None and device == "cpu" and any(isinstance(m, Experts) for m in model.modules()):
        from tandem.rules import load_rules

        # a CPU run of an MoE: routed experts on the C++ kernel (exact: weights kept in the model dtype, or the
        # GGUF's own blocks), as KTransformers users expect; rules="none" keeps everything in torch
        ruleset = load_rules("cpu", ckpt.config.get("model_type"))
    elif rules is not None and rules != "none":
        from tandem.rules import load_rules

        # a bad rule file fails here, before any weight is read
        ruleset = load_rules(str(rules), ckpt.config.get("model_type"))
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if model.tie_word_embeddings else {}
    if ruleset is None:
        materialize(model, ckpt.source, parse_dtype(dtype, ckpt.config), device, tied=tied,
                    aliases=model.checkpoint_aliases, progress=progress)
        placement = {name: Placement(type(m).__name__, device, device) for name, m in model.named_modules() if name}
    else:
        from tandem.rules import inject

        placement = inject(model, ruleset, ckpt.source, ckpt.config["model_type"], parse_dtype(dtype, ckpt.config),
                           tied=tied, aliases=model.checkpoint_aliases)
    model.eval()
    if plan is not None:
        from tandem.plan.auto import check_allocations

        check_allocations(plan)  # more than 5% over the plan on a device: a warning with the numbers
    return LLM(model, ckpt.tokenizer, ckpt.config, ckpt.eos_ids, placement, engine_config)
