"""GET /metrics: the server's counters in Prometheus' text format (prometheus-client), one registry per app."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], float], busy: Callable[[], float], up: Callable[[], float],
                 connections: Callable[[], float], steps: Callable[[], float] = lambda: 0.0):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dllama_http_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("dllama_http_request_duration_seconds", "time to answer a request, "
                                         "streams included", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("dllama_tokens", "tokens: prompt (all), cached (prompt tokens the KV cache "
                              "already held), completion (generated)", ["kind"], registry=r)
        self.time_to_first_token = Histogram("dllama_time_to_first_token_seconds", "from a request's arrival to "
                                             "its first generated token (queue wait and prefill)",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.decode_seconds = Counter("dllama_decode_seconds", "time spent generating tokens after the first",
                                      registry=r)
        self.decode_rate = Gauge("dllama_decode_tokens_per_second", "the last generation's tokens per second after "
                                 "its first token", registry=r)
        Gauge("dllama_queue_depth", "requests waiting for the model", registry=r).set_function(queue_depth)
        Gauge("dllama_engine_busy", "1 while a generation runs", registry=r).set_function(busy)
        Gauge("dllama_model_up", "1 while the model can serve (in front of a cluster: every worker connected)",
              registry=r).set_function(up)
        Gauge("dllama_open_connections", "HTTP connections open", registry=r).set_function(connections)
        Gauge("dllama_engine_steps", "passes over the weights that --parallel's generations shared so far (0 with "
              "--parallel 1)", registry=r).set_function(steps)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"   # a stranger's paths must not grow the label set
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_generation(self, prompt: int, cached: int, completion: int, first_token_s: float,
                           decode_s: float) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("cached").inc(cached)
        self.tokens.labels("completion").inc(completion)
        if completion:
            self.time_to_first_token.observe(first_token_s)
        if completion > 1 and decode_s > 0:
            self.decode_seconds.inc(decode_s)
            self.decode_rate.set((completion - 1) / decode_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
