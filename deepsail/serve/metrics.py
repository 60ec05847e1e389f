"""Prometheus metrics for `/metrics`, named like vLLM's (`vllm:x` -> `deepsail_x`) so dashboards port over.

Latencies are histograms observed by the request handlers; the engine's state (running, waiting, KV blocks,
preemptions, prefix hits) is read from `engine.stats()` at scrape time by a collector, so it is never stale
and costs nothing between scrapes. Each app gets its own registry: several apps in one process (tests) do not
collide, and the process-wide default registry stays clean for the host application.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets in seconds. TTFT spans a cached short prompt (ms) to a long prefill under load (tens of s); inter-token
# latency is one decode step of a batch, ms to ~1 s on CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class EngineCollector(Collector):
    """Gauges and counters read from `engine.stats()` when Prometheus scrapes; nothing while loading."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        if not s:
            return
        gauges = {
            "running": ("deepsail_num_requests_running", "Requests in the running batch."),
            "waiting": ("deepsail_num_requests_waiting", "Requests queued for admission."),
            "kv_blocks_used": ("deepsail_kv_cache_blocks_used", "KV cache blocks in use."),
            "kv_blocks_total": ("deepsail_kv_cache_blocks_total", "KV cache blocks in the pool."),
            "kv_usage": ("deepsail_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)."),
            "route_threshold": ("deepsail_route_threshold", "Difficulty above which `auto` requests go to the cloud."),
        }
        for key, (name, doc) in gauges.items():
            if key in s:
                yield GaugeMetricFamily(name, doc, value=float(s[key]))
        counters = {
            "preemptions": ("deepsail_num_preemptions", "Requests preempted to free KV blocks."),
            "prefix_queries": ("deepsail_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            "prefix_hits": ("deepsail_prefix_cache_hits", "Prompt tokens served from the prefix cache."),
            "requests_aborted": ("deepsail_requests_aborted", "Requests cancelled (client gone, or shutdown)."),
            "steps": ("deepsail_engine_steps", "Forward passes of the engine."),
            "spec_draft_tokens": (
                "deepsail_spec_decode_num_draft_tokens",
                "Speculative decoding (--speculative mtp): tokens the MTP head drafted.",
            ),
            "spec_accepted_tokens": (
                "deepsail_spec_decode_num_accepted_tokens",
                "Speculative decoding: drafted tokens the model kept.",
            ),
        }
        for key, (name, doc) in counters.items():
            if key in s:
                yield CounterMetricFamily(name, doc, value=float(s[key]))


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "deepsail_time_to_first_token_seconds",
            "Time from request arrival to first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "deepsail_inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "deepsail_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "deepsail_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "deepsail_request_finished", "Finished generations by finish reason.", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("deepsail_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generation_tokens = Counter("deepsail_generation_tokens", "Tokens generated.", registry=r)
        # edge/cloud routing (serve/route.py); no samples on a server that does not route
        self.route_requests = Counter(
            "deepsail_route_requests",
            "Routed requests by target (edge, cloud) and mode (auto: the router chose; explicit: the client did).",
            ["target", "mode"],
            registry=r,
        )
        self.route_difficulty = Histogram(
            "deepsail_route_difficulty",
            "Estimated difficulty of `auto` requests (edge prefill entropy, nats, + length term).",
            buckets=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 10.0),
            registry=r,
        )
        # per request, with --speculative: kept / drafted tokens (requests that drafted nothing are not observed)
        self.spec_acceptance = Histogram(
            "deepsail_spec_decode_acceptance_rate",
            "Per request: the share of its MTP-drafted tokens the model kept (speculative decoding).",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
            registry=r,
        )
        r.register(EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
