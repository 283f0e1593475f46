"""`tandem serve MODEL`: the OpenAI- and Ollama-compatible HTTP server."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path


def serve(args) -> int:
    import uvicorn

    import tandem
    from tandem.engine import EngineConfig
    from tandem.serve.app import Server, create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a port number (0..65535)")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    config = EngineConfig(max_batch=args.max_batch, kv_tokens=args.kv_tokens)
    start = time.perf_counter()
    llm = tandem.load(args.model, rules=args.rules, dtype=args.dtype, engine_config=config)
    name = args.served_model_name or Path(args.model).resolve().name
    print(f"loaded {args.model} as '{name}' in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    server = Server(llm, name, api_key=args.api_key, max_queue=args.max_queue, aliases=(args.model,))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal for the previous handler: make that
    # a no-op so a clean shutdown exits 0 (the CLI's contract) instead of dying by the signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI- and Ollama-compatible HTTP server (streaming, continuous batching)")
    p.add_argument("model", help="model directory (config.json + *.safetensors)")
    p.add_argument("--rules", default=None,
                   help="optimize rules: a YAML file, a preset name, 'auto' (planned), or 'none' (torch only)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait beyond --max-batch; more get HTTP 429 (default 64)")
    p.add_argument("--kv-tokens", type=int, default=16384, help="KV-cache capacity in tokens, all sequences")
    p.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and /api (default: $TANDEM_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: directory name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let running requests finish before cancelling them")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=serve)
