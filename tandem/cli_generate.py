"""`tandem run` (one prompt, then a summary line) and `tandem chat` (interactive, streaming)."""

from __future__ import annotations

import argparse
import sys
import time


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (config.json + *.safetensors)")
    p.add_argument("--rules", default=None,
                   help="optimize rules: a YAML file, a preset name, 'auto' (planned), or 'none' (torch only)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                seed=args.seed, stop=args.stop)


def _load(args):
    import tandem

    start = time.perf_counter()
    llm = tandem.load(args.model, rules=args.rules, dtype=args.dtype)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return llm


def run(args) -> int:
    llm = _load(args)
    if args.chat_template:
        out = llm.chat([{"role": "user", "content": args.prompt}], **_sampling(args))
    else:
        out = llm.generate(args.prompt, **_sampling(args))
    print(out.text)
    print(out.summary, file=sys.stderr if args.quiet_summary else sys.stdout)
    return 0


def chat(args) -> int:
    llm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("type a message; /exit or Ctrl-D ends, /reset forgets", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in llm.chat(messages, stream=True, **_sampling(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate from one prompt and print a speed summary")
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--quiet-summary", action="store_true", help="print the summary line on stderr")
    _sampling_args(p)
    p.set_defaults(func=run)

    p = sub.add_parser("chat", help="interactive streaming chat")
    _model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p)
    p.set_defaults(func=chat)
