"""A `tokenizers` tokenizer from GGUF metadata (tokenizer.ggml.*), built to split text as llama.cpp does.

Two models occur: "gpt2" (byte-level BPE: tokens + merges, with a pre-tokenizer regex named by
tokenizer.ggml.pre) and "llama" (SentencePiece: tokens + scores + token types, ▁ for spaces, <0xNN> byte
fallback; its merges are rebuilt from the scores as transformers does when it converts a .model file).
"""

from __future__ import annotations

import logging

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tandem.tokenize.tokenizer import Tokenizer

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = (r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regexes llama.cpp splits with before byte-level BPE (llama-vocab.cpp);
# None: GPT-2's own regex (ByteLevel use_regex); "digits": each digit alone, then GPT-2's regex
PRE = {
    "default": None, "gpt-2": None, "gpt2": None, "phi-2": None, "olmo": None, "jais": None,
    "llama-bpe": (_LLAMA3,), "llama3": (_LLAMA3,), "dbrx": (_LLAMA3,), "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,), "deepseek-r1-qwen": (_QWEN2,), "qwen35": (_QWEN2,),
    "deepseek-v3": _DEEPSEEK3,
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits", "command-r": "digits",
}


def _md_list(md: dict, key: str) -> list:
    v = md.get(key)
    return list(v) if v is not None else []


def _byte_level_pre(pre: str | None):
    kind = PRE.get(pre or "default", None) if (pre or "default") in PRE else None
    if (pre or "default") not in PRE:
        log.info("GGUF tokenizer pre-tokenizer %r is not known to tandem; using GPT-2's", pre)
    if kind is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in kind]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _spm_merges(tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]) -> list:
    """Merges of a SentencePiece vocabulary: every split of a piece into two pieces, best-scored piece first."""
    merges = []
    for i, piece in enumerate(tokens):
        if types and types[i] not in (NORMAL, USER_DEFINED):
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(lr, scores[i] if scores else -i) for lr in local]
    merges.sort(key=lambda m: -m[1])  # stable: equal scores keep their order, as transformers' converter does
    return [m[0] for m in merges]


def tokenizer_from_gguf(md: dict) -> Tokenizer | None:
    """The tokenizer of a GGUF model from its metadata; None if the file carries no vocabulary."""
    kind = md.get("tokenizer.ggml.model")
    tokens = _md_list(md, "tokenizer.ggml.tokens")
    if not tokens or kind in (None, "none"):
        return None
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
    types = _md_list(md, "tokenizer.ggml.token_type")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)

    def tok_id(key: str) -> int | None:
        v = md.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    unk = tok_id("unknown_token_id")
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in _md_list(md, "tokenizer.ggml.merges")]
        pre = md.get("tokenizer.ggml.pre")
        tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3")))
        tok.pre_tokenizer = _byte_level_pre(pre)
        tok.decoder = decoders.ByteLevel()
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", pre in ("llama-bpe", "llama3")))
    else:
        scores = _md_list(md, "tokenizer.ggml.scores")
        merges = _spm_merges(tokens, scores, types, vocab)
        unk_text = tokens[unk] if unk is not None else None
        tok = HFTokenizer(models.BPE(vocab, merges, unk_token=unk_text, fuse_unk=True, byte_fallback=True))
        prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", True))
    # control tokens are special (skipped when decoding); user-defined ones are matched whole but are text
    added = [AddedToken(t, special=types[i] == CONTROL, normalized=False)
             for i, t in enumerate(tokens) if types and types[i] in (CONTROL, USER_DEFINED) and t]
    tok.add_tokens(added)
    bos, eos = tok_id("bos_token_id"), tok_id("eos_token_id")
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is not None) or (add_eos and eos is not None):
        single = ([f"{tokens[bos]}:0"] if add_bos and bos is not None else []) + ["$A:0"]
        single += [f"{tokens[eos]}:0"] if add_eos and eos is not None else []
        specials = {tokens[i]: i for i in (bos if add_bos else None, eos if add_eos else None) if i is not None}
        tok.post_processor = processors.TemplateProcessing(single=" ".join(single),
                                                           special_tokens=list(specials.items()))
    special = {f"{k}_token": tokens[i] for k, i in (("bos", bos), ("eos", eos), ("unk", unk), ("pad", tok_id(
        "padding_token_id"))) if i is not None}
    eos_ids = sorted({i for i in (eos, tok_id("eot_token_id"), tok_id("eom_token_id")) if i is not None})
    template = md.get("tokenizer.chat_template")
    return Tokenizer(tok, template, special, eos_ids, bos)
