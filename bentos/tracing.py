"""OpenTelemetry spans per request: a root ``llm.request`` span with one child per phase (auth, tokenize,
queue, prefill, decode, postprocess), the same split ``PhaseTimings`` measures for ``lockgate profile``.

Off by default. ``exporter: console`` prints spans as JSON on stdout; ``exporter: otlp`` sends them with
the OTLP/HTTP protobuf protocol to a collector (``endpoint``, default ``http://127.0.0.1:4318/v1/traces``:
the OpenTelemetry Collector, Jaeger, Tempo...). The OTLP encoder is ours, on ``opentelemetry-proto``:
the official exporter package pins a protobuf schema version that conflicts with MLflow's.

Spans are built when the request has finished, with the measured start and end times: the phase split
costs nothing while the request runs, and a span is exported in the background (batch processor).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import httpx
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ProtoResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from lockgate.bentos.config import TracingConfig

logger = logging.getLogger(__name__)

ROOT_SPAN = "llm.request"


class OTLPHttpExporter(SpanExporter):
    """OTLP/HTTP with protobuf bodies (``application/x-protobuf``), the collector's port-4318 protocol."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout_s: float = 5.0) -> None:
        self._endpoint = endpoint
        self._client = httpx.Client(
            timeout=timeout_s, headers={"Content-Type": "application/x-protobuf", **headers}
        )

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        body = encode_spans(spans).SerializeToString()
        try:
            response = self._client.post(self._endpoint, content=body)
        except httpx.HTTPError as exc:
            # A collector that is down must never slow down or fail serving: the batch is dropped, said so.
            logger.warning(
                "trace export to %s failed: %s (%d spans dropped)", self._endpoint, exc, len(spans)
            )
            return SpanExportResult.FAILURE
        if response.status_code >= 300:
            logger.warning(
                "trace export to %s answered %d (%d spans dropped)",
                self._endpoint,
                response.status_code,
                len(spans),
            )
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._client.close()


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """An ``ExportTraceServiceRequest`` holding ``spans`` (grouped by resource and scope)."""

    def value(v: object) -> AnyValue:
        if isinstance(v, bool):
            return AnyValue(bool_value=v)
        if isinstance(v, int):
            return AnyValue(int_value=v)
        if isinstance(v, float):
            return AnyValue(double_value=v)
        return AnyValue(string_value=str(v))

    def attributes(attrs: Mapping[str, object] | None) -> list[KeyValue]:
        return [KeyValue(key=k, value=value(v)) for k, v in (attrs or {}).items()]

    grouped: dict[tuple[int, str], tuple[Resource, str, list[Span]]] = {}
    for s in spans:
        ctx = s.get_span_context()
        scope = s.instrumentation_scope.name if s.instrumentation_scope else ""
        key = (id(s.resource), scope)
        entry = grouped.setdefault(key, (s.resource, scope, []))
        entry[2].append(
            Span(
                trace_id=ctx.trace_id.to_bytes(16, "big"),
                span_id=ctx.span_id.to_bytes(8, "big"),
                parent_span_id=s.parent.span_id.to_bytes(8, "big") if s.parent else b"",
                name=s.name,
                kind=Span.SpanKind.SPAN_KIND_SERVER if s.parent is None else Span.SpanKind.SPAN_KIND_INTERNAL,
                start_time_unix_nano=s.start_time or 0,
                end_time_unix_nano=s.end_time or 0,
                attributes=attributes(s.attributes),
                status=Status(
                    code=Status.STATUS_CODE_ERROR if not s.status.is_ok else Status.STATUS_CODE_UNSET
                ),
            )
        )
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=ProtoResource(attributes=attributes(resource.attributes)),
                scope_spans=[ScopeSpans(scope=InstrumentationScope(name=scope), spans=items)],
            )
            for resource, scope, items in grouped.values()
        ]
    )


class RequestTracer:
    """Turns one finished request's phase timings into spans."""

    def __init__(self, config: TracingConfig, service_name: str, model_name: str) -> None:
        resource = Resource.create({"service.name": service_name, "lockgate.model": model_name})
        sampler = ParentBased(TraceIdRatioBased(config.sample_rate))
        self._provider = TracerProvider(resource=resource, sampler=sampler)
        exporter: SpanExporter = (
            ConsoleSpanExporter()
            if config.exporter == "console"
            else OTLPHttpExporter(config.endpoint, config.header_values())
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=config.export_interval_ms)
        )
        self._tracer = self._provider.get_tracer("lockgate.service")

    def record(
        self,
        elapsed_s: float,
        phases: Sequence[tuple[str, float]],
        attributes: Mapping[str, str | int | float | bool],
        failed: bool,
    ) -> None:
        """Spans of a request that started ``elapsed_s`` ago and just ended: the root, then one child per
        phase laid end to end in order (the phases are measured one after another)."""
        end_ns = time.time_ns()
        start_ns = end_ns - int(elapsed_s * 1e9)
        root = self._tracer.start_span(
            ROOT_SPAN, context=_parent_context(), start_time=start_ns, attributes=dict(attributes)
        )
        context = trace.set_span_in_context(root)
        at = start_ns
        for name, seconds in phases:
            child = self._tracer.start_span(name, context=context, start_time=at)
            at = min(end_ns, at + int(seconds * 1e9))
            child.end(end_time=at)
        if failed:
            root.set_status(trace.Status(trace.StatusCode.ERROR))
        root.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Export what is buffered, then stop (service shutdown)."""
        self._provider.shutdown()


def _parent_context() -> Context:
    """Join the caller's trace when a sampled span is current (a client's ``traceparent`` that BentoML's
    ASGI instrumentation picked up); otherwise start a new trace. BentoML's own span is current even
    with its tracing off, unsampled: as a parent it would make ParentBased drop every span of ours."""
    current = trace.get_current_span().get_span_context()
    if current.is_valid and current.trace_flags.sampled:
        return trace.set_span_in_context(trace.NonRecordingSpan(current))
    return Context()


def build_tracer(config: TracingConfig, service_name: str, model_name: str) -> RequestTracer | None:
    if config.exporter == "none":
        return None
    return RequestTracer(config, service_name, model_name)
