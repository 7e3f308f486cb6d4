"""``/metrics`` (``--metrics``): the server in Prometheus' text format, through ``prometheus_client``.

Counters and histograms are updated as work happens (requests by route and status, in the
dispatcher; tokens and latencies, from each engine's :class:`~nkat_runtime.serve.observer.Observer`);
the gauges (queue depth, busy slots, KV blocks, models loaded, load time) are read from the
engines when Prometheus scrapes. Each server has its own registry: nothing is global.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .framework import Route, ServerState
    from .models import ModelSet

PREFIX = "nkat"
# seconds: first tokens on a CPU take from tens of ms (a short prompt) to minutes (a long one)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens read", ["model"], registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.jobs = Counter(f"{PREFIX}_generations", "Generation jobs finished, by how they ended",
                            ["model", "ended"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "From a job's submission to its first piece of text (queue and prefill included)",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Between two pieces of text of one sequence",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self._models: ModelSet | None = None
        r.register(_Gauges(self))

    def observer(self, model: str) -> "ModelObserver":
        return ModelObserver(self, model)

    def watch(self, models: "ModelSet") -> None:
        self._models = models

    def request(self, route: "Route | None", status: int) -> None:
        self.requests.labels(route.path if route is not None else "(no route)", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelObserver:
    """One model's :class:`~nkat_runtime.serve.observer.Observer` (prometheus_client is thread-safe)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.ttft = metrics.ttft.labels(model)
        self.itl = metrics.itl.labels(model)
        self.prompt = metrics.prompt_tokens.labels(model)
        self.generated = metrics.generated_tokens.labels(model)
        self.jobs = metrics.jobs
        self.model = model

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def job_done(self, prompt_tokens: int, generated_tokens: int, aborted: bool) -> None:
        self.prompt.inc(prompt_tokens)
        self.generated.inc(generated_tokens)
        self.jobs.labels(self.model, "aborted" if aborted else "finished").inc()


class _Gauges:
    """Read at scrape time from the loaded engines."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return []  # the families vary with the models loaded: collect() only at scrape

    def collect(self) -> Iterator[GaugeMetricFamily]:
        models = self.metrics._models
        g = {name: GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=["model"]) for name, text in (
            ("queue_depth", "Jobs waiting for a slot"),
            ("slots_busy", "KV-cache slots generating now"),
            ("slots_total", "KV-cache slots"),
            ("kv_blocks_used", "KV pool blocks holding tokens (running, cached or shared)"),
            ("kv_blocks_total", "KV pool blocks"),
            ("model_loaded", "1 while the model is loaded"),
            ("model_load_seconds", "How long the model's last load took"),
        )}
        for entry in (models.entries.values() if models is not None else ()):
            engine = entry.engine
            g["model_loaded"].add_metric([entry.name], 1.0 if engine is not None else 0.0)
            if entry.load_seconds is not None:
                g["model_load_seconds"].add_metric([entry.name], entry.load_seconds)
            if engine is None:
                continue
            pool = engine.cache_stats()
            g["queue_depth"].add_metric([entry.name], engine.stats.queued)
            g["slots_busy"].add_metric([entry.name], sum(1 for s in engine.slot_info() if s.get("is_processing")))
            g["slots_total"].add_metric([entry.name], engine.config.slots)
            g["kv_blocks_used"].add_metric([entry.name], pool["blocks_total"] - pool["blocks_free"])
            g["kv_blocks_total"].add_metric([entry.name], pool["blocks_total"])
        yield from g.values()


async def metrics_route(state: "ServerState", request: web.Request) -> web.Response:
    from .errors import ApiError

    if state.metrics is None:
        raise ApiError(404, "metrics are off: start the server with --metrics", "not_found")
    body = state.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
