"""Serving load: aggregate tokens/s and time to first token at 1, 4, 8 and 16 concurrent streams.

    python bench/serve_load.py --url http://127.0.0.1:8000 [--model NAME] [--tokens 64] [--rounds 2]
    python bench/serve_load.py --serve MODEL_DIR [--max-batch 16] ...   # starts `tandem serve` itself

Every stream is a streaming /v1/chat/completions request with the same shape (a fixed prompt, `--tokens`
new tokens, ignore_eos, greedy), so levels differ only in concurrency. Per level: aggregate tokens/s (all
completion tokens / wall time of the level), per-stream decode tokens/s, time to first token (p50, max), and
the ratio of aggregate tokens/s to the 1-stream level measured in the same run. Writes a markdown table to
bench/results/serve_load-<tag>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT = "Explain, step by step, how a mixture-of-experts layer routes each token to a few experts."


async def one_stream(http: httpx.AsyncClient, url: str, model: str, tokens: int, tag: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"{PROMPT} (request {tag})"}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    usage = None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    n = usage["completion_tokens"] if usage else 0
    return {"ttft": first - start, "total": end - start, "tokens": n,
            "decode_tps": (n - 1) / (end - first) if n > 1 and end > first else 0.0}


async def level(url: str, model: str, streams: int, tokens: int) -> dict:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, url, model, tokens, i) for i in range(streams)))
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results]
    total = sum(r["tokens"] for r in results)
    return {"streams": streams, "tokens": total, "wall_s": wall, "tps": total / wall,
            "stream_tps": statistics.mean(r["decode_tps"] for r in results),
            "ttft_p50": statistics.median(ttfts), "ttft_max": max(ttfts)}


def machine() -> str:
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def start_server(args) -> tuple[subprocess.Popen, str, str]:
    port = args.port
    cmd = [sys.executable, "-m", "tandem", "serve", args.serve, "--port", str(port), "--max-batch",
           str(args.max_batch), "--served-model-name", "bench", "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url, "bench"
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tandem serve did not start (exit {proc.poll()})")
        time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one with --serve)")
    p.add_argument("--serve", default=None, help="model directory: start `tandem serve` on it for the run")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-batch", type=int, default=16, help="with --serve")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--levels", default="1,4,8,16")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    p.add_argument("--rounds", type=int, default=2, help="runs per level; the best is kept")
    p.add_argument("--tag", default="local")
    p.add_argument("--out", default=None, help="markdown file (default bench/results/serve_load-<tag>.md)")
    args = p.parse_args()
    if not args.url and not args.serve:
        p.error("give --url of a running server or --serve MODEL_DIR")
    proc = None
    if args.serve:
        proc, args.url, args.model = start_server(args)
    try:
        model = args.model or httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
        for n in (1, 4):  # warm-up: first-call costs of the prompt and batch shapes are not measured
            asyncio.run(level(args.url, model, n, args.tokens))
        load_before = os.getloadavg()
        rows = []
        for n in [int(x) for x in args.levels.split(",")]:
            runs = [asyncio.run(level(args.url, model, n, args.tokens)) for _ in range(args.rounds)]
            rows.append(max(runs, key=lambda r: r["tps"]))
            r = rows[-1]
            print(f"{n:3d} streams: {r['tps']:8.1f} tok/s aggregate, {r['stream_tps']:7.1f} tok/s per stream, "
                  f"TTFT p50 {r['ttft_p50'] * 1000:7.1f} ms, max {r['ttft_max'] * 1000:7.1f} ms", flush=True)
        metrics = httpx.get(f"{args.url}/metrics").text
        load_after = os.getloadavg()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    base = rows[0]["tps"] if rows and rows[0]["streams"] == 1 else None
    lines = [f"# serve_load: {args.tag}", "",
             f"Command: `{shlex.join(['python', 'bench/serve_load.py', *sys.argv[1:]])}`  ",
             f"Machine: {machine()}  ",
             f"Model: {model}; {args.tokens} new tokens per stream (ignore_eos, greedy), streaming chat "
             f"completions; best of {args.rounds} runs per level.  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M:%S')}; 1-minute load average {load_before[0]:.1f} before, "
             f"{load_after[0]:.1f} after (other jobs on the machine make absolute figures noisy)", "",
             "| streams | tokens | wall s | aggregate tok/s | x 1 stream | per-stream tok/s | TTFT p50 ms | "
             "TTFT max ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['tps'] / base:.2f}" if base else "-"
        lines.append(f"| {r['streams']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tps']:.1f} | {ratio} | "
                     f"{r['stream_tps']:.1f} | {r['ttft_p50'] * 1000:.1f} | {r['ttft_max'] * 1000:.1f} |")
    kv = [line for line in metrics.splitlines() if line.startswith(("tandem_kv_cache", "tandem_max_batch"))]
    lines += ["", "Server /metrics after the run (KV blocks must be back to 0):", "", "```", *kv, "```", ""]
    out = Path(args.out or Path(__file__).parent / "results" / f"serve_load-{args.tag}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
