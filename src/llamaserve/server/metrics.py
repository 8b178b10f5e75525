"""Prometheus metrics under vLLM's names, so existing dashboards work unchanged.

Each app owns its own CollectorRegistry: several servers (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the route

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class ServerMetrics:
    def __init__(self, model_name: str = "unknown") -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, label = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.",
                              label, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between streamed tokens in seconds.",
                             label, buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Mean time per output token of a request.",
                              label, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             label, buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Time a request waited in the engine's queue for a user slot.",
                                    label, buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", label, registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests holding a user slot.", label, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", label, registry=r)
        self.cache_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                 label, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      label, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                   label, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Requests preempted for KV-cache blocks.",
                                   label, registry=r)
        self._engine_totals: dict[str, float] = {}
        self.finished = Counter("vllm:request_success", "Finished requests by finish reason.",
                                label + ["finished_reason"], registry=r)
        self.http_requests = Counter("llamaserve:http_requests", "HTTP requests by route and status.",
                                     ["route", "method", "status"], registry=r)
        self.engine_restarts = Gauge("llamaserve:engine_restarts", "Times the engine process was restarted.",
                                     registry=r)
        self.engine_up = Gauge("llamaserve:engine_up", "1 when the engine is ready, else 0.", registry=r)
        team = ["team"]  # the token's team_id
        self.team_requests = Counter("llamaserve:team_requests", "Requests admitted, per team.", team, registry=r)
        self.team_prompt_tokens = Counter("llamaserve:team_prompt_tokens", "Prompt tokens, per team.", team,
                                          registry=r)
        self.team_generation_tokens = Counter("llamaserve:team_generation_tokens", "Generated tokens, per team.",
                                              team, registry=r)
        self.team_rejected = Counter("llamaserve:team_rejected", "Requests refused by a team limit.",
                                     team + ["limit"], registry=r)
        self._itl_child = (None, None)

    def observe_request(self, *, prompt_tokens: int, generation_tokens: int, ttft: float | None,
                        e2e: float, finish_reason: str | None) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generation_tokens)
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
            if generation_tokens > 1:
                self.tpot.labels(m).observe((e2e - ttft) / (generation_tokens - 1))
        self.e2e.labels(m).observe(e2e)
        if finish_reason:
            self.finished.labels(m, finish_reason).inc()

    def _advance(self, counter: Counter, key: str, total) -> None:
        """Move a counter to the engine's running total (a restarted engine counts from 0 again)."""
        if not isinstance(total, (int, float)):
            return
        last = self._engine_totals.get(key, 0)
        counter.labels(self.model_name).inc(total - last if total >= last else total)
        self._engine_totals[key] = total

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.labels(self.model_name).observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        # Once per streamed token: the labelled child is looked up once, not per call.
        name, child = self._itl_child
        if name != self.model_name:
            name, child = self._itl_child = (self.model_name, self.itl.labels(self.model_name))
        child.observe(seconds)

    def render(self, stats: dict, engine_up: bool, restarts: int) -> bytes:
        m = self.model_name
        self.running.labels(m).set(stats.get("num_running", 0))
        self.waiting.labels(m).set(stats.get("num_waiting", 0))
        self.cache_usage.labels(m).set(stats.get("cache_usage", 0.0))
        for counter, key in ((self.prefix_queries, "prefix_cache_queries"), (self.prefix_hits, "prefix_cache_hits"),
                             (self.preemptions, "preemptions")):
            self._advance(counter, key, stats.get(key))
        self.engine_up.set(1 if engine_up else 0)
        self.engine_restarts.set(restarts)
        return generate_latest(self.registry)
