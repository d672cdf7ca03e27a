"""Every Prometheus metric of the server, in its own registry.

Names follow vLLM's (``vllm:x`` becomes ``phalanx_serve_x``) with the same meaning;
docs/inference.md has the mapping. The operator's autoscaler reads ``phalanx_serve_num_requests_running`` and
``phalanx_serve_num_requests_waiting``.

With ``vllm_names`` every metric is also exported under vLLM's own name (``vllm:`` prefix, the
same ``model_name`` label), plus the few series vLLM dashboards read that have no Phalanx name of
their own: ``vllm:time_per_output_token_seconds`` (vLLM's older name of the inter-token latency
histogram), ``vllm:request_max_num_generation_tokens`` and ``vllm:request_params_n`` (per
request, over its ``n``/``best_of`` sequences) and ``vllm:request_inference_time_seconds``
(first scheduled to finished). So Grafana dashboards and alerts written for vLLM work unchanged.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from phalanx_serve.settings import ServerSettings

PREFIX = "phalanx_serve_"
VLLM_PREFIX = "vllm:"

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


class _Both:
    """One metric under two names: every update goes to each (``inc``, ``set``, ``observe``)."""

    def __init__(self, *children: Any) -> None:
        self.children = children

    def inc(self, amount: float = 1) -> None:
        for child in self.children:
            child.inc(amount)

    def set(self, value: float) -> None:
        for child in self.children:
            child.set(value)

    def observe(self, value: float) -> None:
        for child in self.children:
            child.observe(value)


class ServeMetrics:
    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry | None = None,
        *,
        vllm_names: bool = False,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.vllm_names = vllm_names
        r, labels = self.registry, ["model_name"]
        prefixes = (PREFIX, VLLM_PREFIX) if vllm_names else (PREFIX,)

        def one(children: list[Any]) -> Any:
            return children[0] if len(children) == 1 else _Both(*children)

        def gauge(name: str, doc: str) -> Gauge:
            return one(  # type: ignore[no-any-return]
                [Gauge(p + name, doc, labels, registry=r).labels(model_name) for p in prefixes]
            )

        def counter(name: str, doc: str) -> Counter:
            return one(  # type: ignore[no-any-return]
                [Counter(p + name, doc, labels, registry=r).labels(model_name) for p in prefixes]
            )

        def histogram(name: str, doc: str, buckets: tuple[float, ...], *aliases: str) -> Histogram:
            children = [
                Histogram(p + name, doc, labels, buckets=buckets, registry=r).labels(model_name)
                for p in prefixes
            ]
            if vllm_names:
                children += [
                    Histogram(VLLM_PREFIX + alias, doc, labels, buckets=buckets, registry=r).labels(
                        model_name
                    )
                    for alias in aliases
                ]
            return one(children)  # type: ignore[no-any-return]

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
            "inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            ITL_BUCKETS,
            "time_per_output_token_seconds",
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
        self._success = [
            Counter(
                p + "request_success",
                "Finished requests by finish reason (stop, length, abort).",
                ["model_name", "finished_reason"],
                registry=r,
            )
            for p in prefixes
        ]
        # Per request (all its n/best_of sequences), as vLLM counts them; vLLM names only.
        self.request_max_num_generation_tokens: Histogram | None = None
        self.request_params_n: Histogram | None = None
        self.request_inference_time: Histogram | None = None
        if vllm_names:
            self.request_max_num_generation_tokens = Histogram(
                VLLM_PREFIX + "request_max_num_generation_tokens",
                "Most tokens generated by one sequence of a finished request.",
                labels,
                buckets=TOKEN_COUNT_BUCKETS,
                registry=r,
            ).labels(model_name)
            self.request_params_n = Histogram(
                VLLM_PREFIX + "request_params_n",
                "Sequences per request (n, or best_of when larger).",
                labels,
                buckets=(1, 2, 5, 10, 20),
                registry=r,
            ).labels(model_name)
            self.request_inference_time = Histogram(
                VLLM_PREFIX + "request_inference_time_seconds",
                "First scheduled to finished, per request.",
                labels,
                buckets=REQUEST_LATENCY_BUCKETS,
                registry=r,
            ).labels(model_name)
        self._rejected = Counter(
            PREFIX + "request_rejected",
            "Requests refused before reaching the engine, by reason.",
            ["model_name", "reason"],
            registry=r,
        )
        self.model_name = model_name
        for success in self._success:
            for reason in ("stop", "length", "abort"):
                success.labels(model_name, reason)
        for reason in ("queue_full", "invalid", "unauthorized", "too_large", "not_ready"):
            self._rejected.labels(model_name, reason)

    @classmethod
    def for_settings(cls, settings: ServerSettings) -> ServeMetrics:
        return cls(settings.model_name, vllm_names=settings.vllm_metrics)

    def request_finished(self, reason: str) -> None:
        for success in self._success:
            success.labels(self.model_name, reason).inc()

    def group_finished(
        self, sequences: int, max_generation_tokens: int, inference_s: float
    ) -> None:
        """Every sequence of one request has finished (vLLM's per-request series)."""
        if self.request_max_num_generation_tokens is not None:
            self.request_max_num_generation_tokens.observe(max_generation_tokens)
        if self.request_params_n is not None:
            self.request_params_n.observe(sequences)
        if self.request_inference_time is not None:
            self.request_inference_time.observe(inference_s)

    def request_rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()


# One metric update made in the engine process, replayed on the server's registry:
# (attribute of ServeMetrics, method, arguments).
MetricUpdate = tuple[str, str, tuple[Any, ...]]


class _RecordedMetric:
    def __init__(self, name: str, log: list[MetricUpdate]) -> None:
        self.name, self.log = name, log

    def inc(self, amount: float = 1) -> None:
        self.log.append((self.name, "inc", (amount,)))

    def set(self, value: float) -> None:
        self.log.append((self.name, "set", (value,)))

    def observe(self, value: float) -> None:
        self.log.append((self.name, "observe", (value,)))


class MetricsRecorder:
    """Stands in for ``ServeMetrics`` where the engine runs in a process of its own: updates
    are logged, shipped with each step's outputs and replayed on the server's one registry
    (``replay``), so ``/metrics`` reads the same series whichever process did the work."""

    def __init__(self) -> None:
        self.log: list[MetricUpdate] = []
        self._metrics: dict[str, _RecordedMetric] = {}

    def __getattr__(self, name: str) -> _RecordedMetric:
        if name.startswith("_"):
            raise AttributeError(name)
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = _RecordedMetric(name, self.log)
        return metric

    def request_finished(self, reason: str) -> None:
        self.log.append(("request_finished", "call", (reason,)))

    def group_finished(
        self, sequences: int, max_generation_tokens: int, inference_s: float
    ) -> None:
        self.log.append(("group_finished", "call", (sequences, max_generation_tokens, inference_s)))

    def take(self) -> list[MetricUpdate]:
        """The updates since the last call; one made meanwhile on another thread stays queued."""
        taken = self.log[:]
        del self.log[: len(taken)]
        return taken


def replay(metrics: ServeMetrics, updates: list[MetricUpdate]) -> None:
    for name, method, args in updates:
        target = getattr(metrics, name)
        if method == "call":
            target(*args)
        elif target is not None:  # a vLLM-only series is None without vllm_names
            getattr(target, method)(*args)
