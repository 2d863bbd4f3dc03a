"""Prometheus metrics, one registry per app (so tests can build several apps in one process).

HTTP traffic is exported twice: as sglora_http_* (the service's own names) and as http_server_requests_seconds
{method, uri, status, outcome} — the names Spring Boot / Micrometer services export, which stock dashboards and
alert rules query — so sglora drops into an existing fleet's dashboards without a recording rule."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("sglora_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram("sglora_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.http_server_requests = Histogram(
            "http_server_requests_seconds", "HTTP server requests (Micrometer's name and labels)",
            ["method", "uri", "status", "outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("sglora_cache_hits", "generation cache hits", ["backend"], registry=r)
        self.cache_misses = Counter("sglora_cache_misses", "generation cache misses", ["backend"], registry=r)
        self.cache_coalesced = Counter("sglora_cache_coalesced",
                                       "requests that waited for an identical in-flight generation", registry=r)
        self.cache_lock_waits = Counter("sglora_cache_lock_waits",
                                        "misses that waited for another replica generating the same key", registry=r)
        self.cache_corrupt = Counter("sglora_cache_corrupt", "cache entries that failed to load and were replaced",
                                     registry=r)
        self.cache_errors = Counter("sglora_cache_errors", "cache backend errors (requests went on as misses)",
                                    ["backend", "op"], registry=r)
        self.cache_bypassed = Counter("sglora_cache_bypassed",
                                      "cache operations skipped while backing off after a backend error", registry=r)
        self.ids_not_stored = Counter("sglora_adapter_ids_not_stored",
                                      "generations whose ids could not be stored (answered as not downloadable)",
                                      registry=r)
        self.generations = Counter("sglora_generations", "adapters generated (cache misses)", ["strategy"],
                                   registry=r)
        self.generation_seconds = Histogram("sglora_generation_duration_seconds",
                                            "description -> adapter file, on a cache miss", ["strategy"],
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.retrieval_seconds = Histogram("sglora_retrieval_duration_seconds", "embed + rank (images already decoded)",
                                           ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("sglora_http_requests_in_flight", "HTTP requests being handled", registry=r)
        self.work_running = Gauge("sglora_work_running", "requests holding a model-work slot", registry=r)
        self.work_waiting = Gauge("sglora_work_queue_depth", "requests waiting for a model-work slot", registry=r)
        self.shed = Counter("sglora_shed", "requests refused with 503 or dropped before their work started",
                            ["reason"], registry=r)
        self.work_cancelled = Counter("sglora_work_cancelled", "model-work steps skipped because the client had gone",
                                      ["step"], registry=r)
        self.body_bytes = Gauge("sglora_body_bytes_in_flight", "request body bytes admitted and not yet released",
                                registry=r)
        self.loop_lag = Histogram("sglora_event_loop_lag_seconds", "how late the event loop ran a timer (stalls)",
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.batch_queue = Gauge("sglora_batch_queue_depth", "encodings waiting for the next micro-batch",
                                 registry=r)
        self.batch_size = Histogram("sglora_batch_size", "items per micro-batched forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.ready = Gauge("sglora_ready", "1 once the model is loaded and warm", registry=r)


def outcome(status: int) -> str:
    """Micrometer's `outcome` label: the status class."""
    return {1: "INFORMATIONAL", 2: "SUCCESS", 3: "REDIRECTION", 4: "CLIENT_ERROR", 5: "SERVER_ERROR"}.get(
        status // 100, "UNKNOWN")
