"""Tokenizer from tokenizer.json and the chat template from tokenizer_config.json, rendered with jinja2."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


class TemplateError(ValueError):
    """A chat template that cannot be rendered for the given messages."""


def _raise(msg: str):
    raise TemplateError(msg)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(v) -> str | None:
    """Special tokens appear as "<s>" or {"content": "<s>", ...} in tokenizer_config.json."""
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, apply_chat_template(messages) -> text."""

    def __init__(self, tok: HFTokenizer, chat_template: str | None = None, special: dict | None = None,
                 eos_ids: list[int] | None = None, bos_id: int | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self.special = special or {}  # bos_token, eos_token, ... as text, for the template
        self.eos_ids = eos_ids or []
        self.bos_id = bos_id
        self._template = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer of a model directory, or None if it has no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            return None
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path / 'tokenizer.json'}: cannot be read as a tokenizer ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        special = {k: _token_text(v) for k, v in cfg.items() if k.endswith("_token") and _token_text(v)}
        eos = _eos_ids(path, tok, special.get("eos_token"))
        bos = tok.token_to_id(special["bos_token"]) if special.get("bos_token") else None
        return cls(tok, template, special, eos, bos)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages`, as the model's chat template renders it."""
        if not self.chat_template:
            raise TemplateError("this model has no chat template (tokenizer_config.json has no chat_template)")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"chat template line {e.lineno}: {e.message}") from None
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special, **kwargs)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template: {e}") from None


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}") from None


def _eos_ids(path: Path, tok: HFTokenizer, eos_text: str | None) -> list[int]:
    """End-of-sequence ids from generation_config.json, config.json and tokenizer_config.json, together."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        v = _read_json(path / name).get("eos_token_id")
        ids += v if isinstance(v, list) else [v] if isinstance(v, int) else []
    if eos_text and tok.token_to_id(eos_text) is not None:
        ids.append(tok.token_to_id(eos_text))
    return sorted(set(ids))
