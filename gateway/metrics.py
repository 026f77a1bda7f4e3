"""Prometheus metrics of one gateway process, served on their own listener.

Names match what operators of the original Rust cortex already graph. Labels are
bounded: the model (a catalogue id, or ``_unknown``), the dialect, the status,
and the API key's name (never its secret; only keys that exist, and only on a
gateway with keys).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from cortex.protocol import WorkerAdvert
from cortex.protocol.messages import LOAD_SECONDS_BUCKETS

UNKNOWN_MODEL = "_unknown"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("cortex_requests", "Requests answered", ["model", "dialect", "status"], registry=r)
        self.errors = Counter(
            "cortex_request_errors", "Requests that ended in an error", ["model", "dialect", "code"], registry=r
        )
        self.prompt_tokens = Counter("cortex_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("cortex_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds", "Request received to first generated token", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "cortex_request_duration_seconds", "Request received to end of answer", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens_per_second = Histogram(
            "cortex_tokens_per_second", "Generation speed of one request after its first token", ["model"],
            buckets=_RATE_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("cortex_requests_in_flight", "Requests being answered", ["model"], registry=r)
        self.key_requests = Counter("cortex_key_requests", "Requests answered, by API key", ["key", "status"],
                                    registry=r)  # fmt: skip
        self.key_tokens = Counter(
            "cortex_key_tokens", "Tokens by API key and kind (prompt, completion, cached)", ["key", "kind"], registry=r
        )
        self.key_slot_seconds = Counter(
            "cortex_key_slot_seconds", "Seconds requests held a batch slot on a worker, by API key", ["key"], registry=r
        )
        self.failovers = Counter(
            "cortex_failovers", "Answers continued on another worker after theirs died or its stream broke", ["model"],
            registry=r,
        )  # fmt: skip

    def track_fleet(self, workers: Callable[[], list[WorkerAdvert]]) -> None:
        """Export the fleet's lifecycle, residency and memory from the workers' adverts."""
        self.registry.register(FleetCollector(workers))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics listener in a thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


@dataclass
class RequestTimer:
    """Collects one request's timings and token counts, then records them once."""

    metrics: Metrics
    model: str
    dialect: str
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    slot_seconds: float = 0.0
    on_done: Callable[[RequestTimer, int], Awaitable[None] | None] | None = None
    """Called once the request is recorded, with its status (usage accounting, giving back a rate-limit lease);
    what it returns to wait for is kept in `settling`."""
    settling: Awaitable[None] | None = None
    finished: bool = False

    def __post_init__(self) -> None:
        self.metrics.in_flight.labels(self.model).inc()

    def saw_tokens(self, n: int) -> None:
        if n and self.first_token is None:
            self.first_token = time.monotonic()
            self.metrics.ttft.labels(self.model).observe(self.first_token - self.started)

    def done(self, status: int, error_code: str | None = None) -> None:
        """Record the request's end, once (later calls do nothing)."""
        if self.finished:
            return
        self.finished = True
        end = time.monotonic()
        labels = self.metrics
        labels.in_flight.labels(self.model).dec()
        labels.requests.labels(self.model, self.dialect, str(status)).inc()
        if error_code is not None:
            labels.errors.labels(self.model, self.dialect, error_code).inc()
        if self.prompt_tokens:
            labels.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
        if self.completion_tokens:
            labels.completion_tokens.labels(self.model).inc(self.completion_tokens)
        if self.on_done is not None:
            self.settling = self.on_done(self, status)
        if status < 400:
            labels.duration.labels(self.model).observe(end - self.started)
            if self.first_token is not None and self.completion_tokens > 1 and end > self.first_token:
                labels.tokens_per_second.labels(self.model).observe(
                    (self.completion_tokens - 1) / (end - self.first_token)
                )


class FleetCollector(Collector):
    """Metrics read from the live workers' adverts at scrape time.

    Every gateway exports the same values (labelled by worker), so a fleet
    scraped through several gateways agrees; a worker's counters restart with
    it, as a process's do.
    """

    def __init__(self, workers: Callable[[], list[WorkerAdvert]]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        cold = CounterMetricFamily("cortex_cold_starts", "Models loaded", labels=["model", "worker"])
        failures = CounterMetricFamily(
            "cortex_model_load_failures", "Model loads that failed", labels=["model", "worker"]
        )
        evictions = CounterMetricFamily("cortex_evictions", "Models unloaded, by reason", labels=["reason", "worker"])
        host_loads = CounterMetricFamily("cortex_host_tier_loads", "Models loaded back from a worker's host tier",
                                         labels=["model", "worker"])  # fmt: skip
        called_off = CounterMetricFamily("cortex_loads_called_off", "Cold loads called off: nobody waited any more",
                                         labels=["model", "worker"])  # fmt: skip
        load = HistogramMetricFamily("cortex_model_load_seconds", "Time to load a model", labels=["worker"])
        resident = GaugeMetricFamily("cortex_model_resident", "1 for each model a worker holds, by state",
                                     labels=["model", "worker", "state"])  # fmt: skip
        in_flight = GaugeMetricFamily("cortex_model_in_flight", "Requests running", labels=["model", "worker"])
        queue = GaugeMetricFamily("cortex_model_queue_depth", "Requests waiting in a model's queue", labels=["model"])
        memory = GaugeMetricFamily("cortex_worker_memory_bytes",
                                   "Worker memory: budget, used, reserved, device total, host tier size and use",
                                   labels=["worker", "device", "kind"])  # fmt: skip
        depths: dict[str, int] = {}
        for advert in self.workers():
            w = advert.worker_id
            for kind, value in (("budget", advert.memory_budget), ("used", advert.memory_used),
                                ("reserved", advert.memory_reserved), ("total", advert.memory_total)):  # fmt: skip
                memory.add_metric([w, advert.device, kind], value)
            if advert.host_cache_bytes:
                memory.add_metric([w, advert.device, "host_cache"], advert.host_cache_bytes)
                memory.add_metric([w, advert.device, "host_cache_used"], advert.host_cache_used)
            for state in advert.models:
                resident.add_metric([state.id, w, state.state], 1)
                in_flight.add_metric([state.id, w], state.in_flight)
                depths[state.id] = max(depths.get(state.id, 0), state.queue_depth)
            life = advert.lifecycle
            if life is None:
                continue
            for model, n in life.cold_starts.items():
                cold.add_metric([model, w], n)
            for model, n in life.load_failures.items():
                failures.add_metric([model, w], n)
            for reason, n in life.evictions.items():
                evictions.add_metric([reason, w], n)
            for model, n in life.host_tier_loads.items():
                host_loads.add_metric([model, w], n)
            for model, n in life.loads_called_off.items():
                called_off.add_metric([model, w], n)
            if life.load_seconds_buckets:
                buckets = [(str(b), n) for b, n in zip(LOAD_SECONDS_BUCKETS, life.load_seconds_buckets, strict=False)]
                load.add_metric([w], [*buckets, ("+Inf", life.loads)], life.load_seconds_sum)
        for model, depth in depths.items():
            queue.add_metric([model], depth)
        yield from (cold, failures, evictions, host_loads, called_off, load, resident, in_flight, queue, memory)
