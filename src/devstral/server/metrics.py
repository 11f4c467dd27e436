"""Counters for `GET /metrics`, rendered in Prometheus' text exposition format (version 0.0.4)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.generation_s = 0.0  # summed wall time of finished generations, for tok/s

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def tokens(self, prompt: int, completion: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.generation_s += seconds

    def render(self, worker: Any) -> str:
        stats = worker.stats
        waits = stats.queue_wait_s
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP devstral_{name} {help_}")
                lines.append(f"# TYPE devstral_{name} {kind}")
                lines.extend(f"devstral_{name}{labels} {_num(v)}" for labels, v in samples)

            reqs = sorted(self.requests.items())
            metric("requests_total", "counter", "HTTP requests answered, by route and status.",
                   [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in reqs] or [("", 0)])
            metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("completion_tokens_total", "counter", "Completion tokens generated.",
                   [("", self.completion_tokens)])
            metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", worker.queue_depth)])
            metric("requests_active", "gauge", "Requests holding a slot.", [("", worker.active)])
            metric("slots_total", "gauge", "Requests that can be generated concurrently.", [("", worker.parallel)])
            tok_s = self.completion_tokens / stats.busy_s if stats.busy_s > 0 else 0.0
            metric("tokens_per_second", "gauge",
                   "Completion tokens per second of engine busy time since start.", [("", tok_s)])
            metric("engine_busy_seconds_total", "counter", "Seconds the engine spent generating.",
                   [("", stats.busy_s)])
            metric("engine_steps_total", "counter", "Generation steps run by the engine.", [("", stats.steps)])
            metric("requests_cancelled_total", "counter", "Generations stopped early (client gone).",
                   [("", stats.cancelled)])
            metric("requests_failed_total", "counter", "Generations that ended in an error.", [("", stats.failed)])
            metric("queue_wait_seconds_avg", "gauge", "Mean wait for a slot over the last 256 requests.",
                   [("", sum(waits) / len(waits) if waits else 0.0)])
            engine = getattr(getattr(worker, "llm", None), "_engine", None)
            if engine is not None:
                cache = engine.blocks.stats
                metric("engine_sequences_running", "gauge", "Sequences in the engine's batch.",
                       [("", engine.num_running)])
                metric("engine_sequences_waiting", "gauge", "Sequences admitted but waiting for KV blocks or budget.",
                       [("", engine.num_waiting)])
                metric("kv_cache_blocks_free", "gauge", "Free blocks of the paged KV cache (cached ones included).",
                       [("", engine.blocks.num_free)])
                metric("kv_cache_blocks_total", "gauge", "Blocks of the paged KV cache.", [("", engine.blocks.num_blocks)])
                metric("prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
                       [("", cache.queried_tokens)])
                metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served by the prefix cache.",
                       [("", cache.hit_tokens)])
                metric("prefix_cache_hit_rate", "gauge", "Share of prompt tokens served by the prefix cache.",
                       [("", cache.hit_rate)])
                # counted by the engine as each token is made, so a rate over them is live (the
                # prompt/completion totals above move when a request ends)
                metric("engine_generated_tokens_total", "counter", "Tokens sampled by the engine so far.",
                       [("", engine.stats.generated_tokens)])
                metric("engine_prompt_tokens_total", "counter", "Prompt tokens the engine has computed so far.",
                       [("", engine.stats.prompt_tokens)])
                drafted, kept = engine.stats.drafted_tokens, engine.stats.accepted_tokens
                metric("speculative_draft_tokens_total", "counter", "Prompt-lookup draft tokens verified.",
                       [("", drafted)])
                metric("speculative_accepted_tokens_total", "counter", "Draft tokens kept after verification.",
                       [("", kept)])
                metric("speculative_acceptance_rate", "gauge", "Share of draft tokens kept.",
                       [("", kept / drafted if drafted else 0.0)])
                metric("engine_preemptions_total", "counter", "Sequences preempted for KV blocks (recomputed later).",
                       [("", engine.scheduler.num_preemptions)])
            metric("uptime_seconds", "gauge", "Seconds since the server started.", [("", time.time() - self.started)])
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"
