"""vLLM's scheduler statistics for the service: lockgate's ``llm_engine_*`` Prometheus gauges and the
numbers ``/capacity`` shows, fed by a vLLM stat logger (vLLM calls it after every engine step).

vLLM also keeps its own Prometheus logger (the ``vllm:*`` series) next to any custom one; both reach
the service's ``/metrics``."""

from __future__ import annotations

from typing import Any


class EngineMetrics:
    """vLLM's own scheduler statistics for Prometheus and /capacity: requests running and waiting in
    the engine, KV-cache usage, prefix-cache queries and hits (per served version).

    A vLLM stat logger (``vllm.v1.metrics.loggers.StatLoggerBase``; vLLM calls ``record`` after every
    engine step). Prometheus metrics are created lazily, inside the worker, for the same reason as
    the service's own (bentos/llm_service.py ``ServiceMetrics``): BentoML sets multi-process mode after
    import. Metric objects are shared by the engines of one process (old and new during a hot swap).
    """

    _prometheus: dict[str, Any] | None = None

    def __init__(self, version: str) -> None:
        self.version = version
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else None

    def record(self, scheduler_stats: Any) -> None:
        if scheduler_stats is None:
            return
        self.running = scheduler_stats.num_running_reqs
        self.waiting = scheduler_stats.num_waiting_reqs
        self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
        prefix = scheduler_stats.prefix_cache_stats
        queries, hits = (prefix.queries, prefix.hits) if prefix is not None and not prefix.reset else (0, 0)
        self.prefix_queries += queries
        self.prefix_hits += hits
        metrics = self.prometheus()
        labels = {"version": self.version}
        metrics["running"].labels(**labels).set(self.running)
        metrics["waiting"].labels(**labels).set(self.waiting)
        metrics["kv_usage"].labels(**labels).set(self.kv_cache_usage)
        if queries:
            metrics["prefix_queries"].labels(**labels).inc(queries)
        if hits:
            metrics["prefix_hits"].labels(**labels).inc(hits)

    def as_dict(self) -> dict[str, Any]:
        rate = self.prefix_hit_rate
        return {
            "engine_running": self.running,
            "engine_waiting": self.waiting,
            "kv_cache_usage": round(self.kv_cache_usage, 4),
            "prefix_cache_queries": self.prefix_queries,
            "prefix_cache_hits": self.prefix_hits,
            "prefix_cache_hit_rate": None if rate is None else round(rate, 4),
        }

    @classmethod
    def prometheus(cls) -> dict[str, Any]:
        if cls._prometheus is None:
            from prometheus_client import Counter, Gauge

            cls._prometheus = {
                "running": Gauge(
                    "llm_engine_requests_running", "Requests in the vLLM engine's running batch.",
                    ["version"], multiprocess_mode="max",
                ),
                "waiting": Gauge(
                    "llm_engine_requests_waiting", "Requests queued inside the vLLM engine.",
                    ["version"], multiprocess_mode="max",
                ),
                "kv_usage": Gauge(
                    "llm_engine_kv_cache_usage_ratio", "Share of the vLLM engine's KV-cache blocks in use.",
                    ["version"], multiprocess_mode="max",
                ),
                "prefix_queries": Counter(
                    "llm_engine_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                    ["version"],
                ),
                "prefix_hits": Counter(
                    "llm_engine_prefix_cache_hits", "Prompt tokens found in the prefix cache.", ["version"]
                ),
            }  # fmt: skip
        return cls._prometheus


def stat_logger_factory(metrics: EngineMetrics) -> Any:
    """A vLLM stat-logger factory that feeds ``metrics`` (vLLM's StatLoggerBase, imported lazily)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            metrics.record(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Logger
