"""Every Prometheus metric of the server, in its own registry.

Names follow vLLM's (``vllm:x`` becomes ``phalanx_serve_x``) with the same meaning, so dashboards
and autoscaling rules written for vLLM carry over; docs/inference.md has the mapping. The
operator's autoscaler reads ``phalanx_serve_num_requests_running`` and
``phalanx_serve_num_requests_waiting``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "phalanx_serve_"

# Bucket edges as in vLLM: latency from milliseconds (CPU toys) to minutes (long generations).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
    0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class ServeMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r).labels(
                model_name
            )

        self.num_requests_running = gauge(
            "num_requests_running", "Requests in the running batch (prefill or decode)."
        )
        self.num_requests_waiting = gauge(
            "num_requests_waiting", "Requests accepted but waiting for a batch slot."
        )
        self.kv_cache_usage_perc = gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."
        )
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens whose keys/values came from the prefix cache."
        )
        self.num_preemptions = counter(
            "num_preemptions", "Sequences preempted (blocks freed, recomputed later)."
        )
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Arrival to first generated token, per request.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "Arrival to last token, per finished request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds",
            "Time a request waited before its prefill started.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prefill_time = histogram(
            "request_prefill_time_seconds",
            "Time spent in the prefill step, per request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_decode_time = histogram(
            "request_decode_time_seconds",
            "First token to last token, per request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt length per finished request.", TOKEN_COUNT_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens",
            "Generated tokens per finished request.",
            TOKEN_COUNT_BUCKETS,
        )
        self._success = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason (stop, length, abort).",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._rejected = Counter(
            PREFIX + "request_rejected",
            "Requests refused before reaching the engine, by reason.",
            ["model_name", "reason"],
            registry=r,
        )
        self.model_name = model_name
        for reason in ("stop", "length", "abort"):
            self._success.labels(model_name, reason)
        for reason in ("queue_full", "invalid", "unauthorized", "too_large", "not_ready"):
            self._rejected.labels(model_name, reason)

    def request_finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def request_rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()
