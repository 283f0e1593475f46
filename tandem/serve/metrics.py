"""/metrics in the Prometheus text format: queue depth, running sequences, tokens/s, KV-cache use."""

from __future__ import annotations


def render_metrics(server) -> str:
    loop, s = server.loop, server.loop.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]] | float) -> None:
        lines.append(f"# HELP tandem_{name} {help}")
        lines.append(f"# TYPE tandem_{name} {kind}")
        for labels, value in samples if isinstance(samples, list) else [("", samples)]:
            lines.append(f"tandem_{name}{labels} {value:g}" if isinstance(value, float) else
                         f"tandem_{name}{labels} {value}")

    metric("queue_depth", "gauge", "Requests waiting for a slot in the running batch.", loop.queued())
    metric("running_sequences", "gauge", "Sequences in the running batch.", s.running)
    metric("max_batch", "gauge", "Sequences decoded together at most (--max-batch).", server.max_batch)
    metric("requests_in_flight", "gauge", "Requests admitted and not yet finished.", server.active)
    metric("tokens_generated_total", "counter", "Tokens generated since start.", s.tokens_generated)
    metric("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           float(round(loop.tokens_per_s(), 3)))
    metric("kv_cache_used_blocks", "gauge", "KV-cache blocks held by sequences.", s.used_blocks)
    metric("kv_cache_blocks", "gauge", "KV-cache blocks in all.", s.num_blocks)
    metric("kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.",
           float(round(s.used_blocks / s.num_blocks, 6)) if s.num_blocks else 0.0)
    metric("requests_finished_total", "counter", "Requests finished, by reason.",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(server.finished.items())] or [('{reason="stop"}', 0)])
    metric("request_errors_total", "counter", "Requests answered with an error, by HTTP status.",
           [(f'{{status="{c}"}}', n) for c, n in sorted(server.rejected.items())] or [('{status="429"}', 0)])
    metric("engine_errors_total", "counter", "Engine steps that failed (their requests got an error).", s.errors)
    return "\n".join(lines) + "\n"
