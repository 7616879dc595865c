"""Prometheus metrics of the server (`GET /metrics`), in a registry of their own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from jmoe.serve.outputs import Completion

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """Request, token, queue and MoE metrics of one engine.

    Gauges (queue depth, busy slots, batch occupancy, tokens/s) are read from the engine's
    scheduler when scraped; counters and histograms are fed by `observe` / `error`.
    """

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        scheduler, slots = engine.scheduler, engine.num_slots
        reg = dict(registry=self.registry)
        self.requests = Counter(
            "jmoe_requests", "Finished requests", ["endpoint", "finish_reason"], **reg
        )
        self.errors = Counter(
            "jmoe_error_responses", "Error responses by HTTP status", ["status"], **reg
        )
        self.prompt_tokens = Counter("jmoe_prompt_tokens", "Prompt tokens processed", **reg)
        self.generation_tokens = Counter("jmoe_generation_tokens", "Tokens generated", **reg)
        Gauge("jmoe_queue_depth", "Requests waiting for a decode slot", **reg).set_function(
            lambda: scheduler.queue_depth
        )
        Gauge("jmoe_active_slots", "Decode slots in use", **reg).set_function(
            lambda: scheduler.active_slots
        )
        Gauge("jmoe_batch_occupancy", "Fraction of decode slots in use", **reg).set_function(
            lambda: scheduler.active_slots / slots
        )
        Gauge(
            "jmoe_generation_tokens_per_second", "Tokens generated per second (last 10 s)", **reg
        ).set_function(scheduler.tokens_per_second)
        self.time_to_first_token = Histogram(
            "jmoe_time_to_first_token_seconds",
            "Seconds from arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            **reg,
        )
        self.latency = Histogram(
            "jmoe_request_latency_seconds",
            "Seconds from arrival to the last token",
            buckets=LATENCY_BUCKETS,
            **reg,
        )
        max_experts = max(engine.config.moe.num_experts, 1)
        self.active_experts = Histogram(
            "jmoe_active_experts_per_token",
            "Per request: mean experts run per MoE layer for each generated token",
            buckets=[i / 4 for i in range(4 * max_experts + 1)],
            **reg,
        )

        Gauge(
            "jmoe_device_expert_bytes",
            "Device bytes of routed expert weights (all, or the offloaded experts' cache)",
            **reg,
        ).set_function(lambda: engine.device_expert_bytes)
        if (cache := getattr(engine.steps, "expert_cache", None)) is not None:
            self.registry.register(ExpertCacheCollector(cache))

    def observe(self, endpoint: str, completion: Completion) -> None:
        """Counts a finished request."""
        self.requests.labels(endpoint, completion.finish_reason).inc()
        self.prompt_tokens.inc(len(completion.prompt_ids))
        self.generation_tokens.inc(len(completion.token_ids))
        if completion.time_to_first_token is not None:
            self.time_to_first_token.observe(completion.time_to_first_token)
        self.latency.observe(completion.latency)
        if completion.active_experts is not None:
            self.active_experts.observe(completion.active_experts)

    def error(self, status: int) -> None:
        """Counts an error response."""
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ExpertCacheCollector:
    """The offloaded experts' cache counters (`jmoe.serve.offload.CacheStats`), read when
    scraped."""

    COUNTERS = {
        "hits": "Needed expert weight sets already on the device",
        "misses": "Needed expert weight sets copied in on demand",
        "evictions": "Expert weight sets dropped from the device cache",
        "bytes_moved": "Bytes of expert weights copied from host to device",
        "prefetched": "Expert weight sets copied in ahead of need",
        "prefetch_hits": "Prefetched expert weight sets that were then needed",
        "prefetch_wasted": "Prefetched expert weight sets that were not needed",
    }

    def __init__(self, cache):
        self.cache = cache

    def collect(self):
        stats = self.cache.stats
        for field, documentation in self.COUNTERS.items():
            name = f"jmoe_expert_cache_{field}"
            yield CounterMetricFamily(name, documentation, value=getattr(stats, field))
