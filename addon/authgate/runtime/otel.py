"""OpenTelemetry traces for either door: the spans, the W3C trace context in
and out, the export over OTLP/HTTP. Imported only when tracing is configured
(`authgate.runtime.tracing.open_tracing`); needs the `otel` extra.

Spans (names and attributes are in docs/operations.md#traces):

    authgate.request (server, door 1) or authgate.check (server, door 2)
    ├── authgate.decision
    │   ├── authgate.password_check      (a bcrypt check, in a thread)
    │   ├── authgate.key_set.wait        (a request waiting for a key fetch)
    │   │   └── authgate.key_set.fetch   (the fetch it started)
    │   └── authgate.store               (the round trip to Redis)
    └── authgate.forward (client, door 1: request sent -> response headers)

Ended spans go to a `BatchSpanProcessor`: a bounded queue (spans beyond it are
dropped) that a thread of its own exports, so a slow or absent collector
never holds a request up. The SDK's own environment variables tune the rest:
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS,
OTEL_EXPORTER_OTLP_TIMEOUT, OTEL_BSP_*, OTEL_TRACES_SAMPLER.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authgate.core.decision import Decision
from authgate.runtime.tracing import Attributes

logger = logging.getLogger("authgate")
_W3C = TraceContextTextMapPropagator()
_SERVICE = "authgate"
SHUTDOWN_SECONDS = 3.0  # how long a stopping door waits for its last spans' export


def _version() -> str:
    try:
        return version("authgate")
    except PackageNotFoundError:
        return "unknown"


def resource(door: str) -> Resource:
    """service.name `authgate` unless OTEL_SERVICE_NAME (or service.name in
    OTEL_RESOURCE_ATTRIBUTES) names it; the version and the door."""
    found = Resource.create({"service.version": _version(), "authgate.door": door})
    name = found.attributes.get(SERVICE_NAME)
    if not isinstance(name, str) or name.startswith("unknown_service"):
        found = found.merge(Resource({SERVICE_NAME: _SERVICE}))
    return found


def incoming(traceparents: Sequence[str], tracestates: Sequence[str]) -> trace.SpanContext | None:
    """The W3C trace context a request carries: one well-formed `traceparent`
    (several are none), and its `tracestate` (fields joined, RFC 9110 §5.3)."""
    if len(traceparents) != 1:
        return None
    carrier = {"traceparent": traceparents[0]}
    if tracestates:
        carrier["tracestate"] = ",".join(tracestates)
    context = trace.get_current_span(_W3C.extract(carrier)).get_span_context()
    return context if context.is_valid else None


class Tracing:
    """One door's tracer and exporter. `processor` replaces the batching
    OTLP export (the tests give an in-memory exporter)."""

    def __init__(self, endpoint: str, door: str, processor: SpanProcessor | None = None) -> None:
        self.endpoint = endpoint
        self.door = door
        # No exit handler of the SDK's: the door calls `shutdown` when it stops.
        self.provider = TracerProvider(resource=resource(door), shutdown_on_exit=False)
        self.provider.add_span_processor(
            processor or BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
        )
        self.tracer = self.provider.get_tracer("authgate", _version())
        logger.info(f"authgate: traces to {endpoint} (OTLP/HTTP)")

    # --- spans ---------------------------------------------------------------------------

    def server(
        self,
        name: str,
        traceparents: Sequence[str],
        tracestates: Sequence[str],
        trusted: bool,
        attributes: Attributes,
    ) -> Span:
        """The span of one request (or check request), started now. Its parent
        is the incoming `traceparent` when the peer is trusted; otherwise
        the request starts a trace of its own, linked to the one it names
        (OpenTelemetry's advice for a public endpoint: a client cannot join
        the gateway's spans to a trace it chose)."""
        parent = incoming(traceparents, tracestates)
        links: list[Link] = []
        context = Context()  # a new trace unless the incoming one is continued
        if parent is not None:
            if trusted:
                context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
            else:
                links.append(Link(parent, {"authgate.link": "traceparent of an untrusted peer"}))
        return self.tracer.start_span(
            name, context, SpanKind.SERVER, attributes=attributes, links=links
        )

    @contextlib.contextmanager
    def decision(self, parent: Span) -> Iterator[Span]:
        """`authgate.decision`, child of `parent` and the current span while
        the block runs (the store, key-set and bcrypt spans go under it)."""
        context = trace.set_span_in_context(parent)
        with self.tracer.start_as_current_span("authgate.decision", context) as span:
            yield span

    def start_decision(self, parent: Span) -> Span:
        """`authgate.decision`, child of `parent`, started now and not made
        current (for judging that starts no span of its own)."""
        return self.tracer.start_span("authgate.decision", trace.set_span_in_context(parent))

    def span(
        self, name: str, attributes: Attributes | None = None
    ) -> contextlib.AbstractContextManager[Span]:
        """A child of the current span, current while the block runs."""
        return self.tracer.start_as_current_span(name, attributes=attributes)

    def forward(self, parent: Span, attributes: Attributes) -> tuple[Span, list[tuple[str, str]]]:
        """`authgate.forward` (the request to the backend), started now, and the
        `traceparent` (and `tracestate`) fields that name it to the backend."""
        span = self.tracer.start_span(
            "authgate.forward",
            trace.set_span_in_context(parent),
            SpanKind.CLIENT,
            attributes=attributes,
        )
        fields: dict[str, str] = {}
        _W3C.inject(fields, trace.set_span_in_context(span))
        return span, list(fields.items())

    # --- what is known at the end ----------------------------------------------------------

    @staticmethod
    def decided(span: Span, d: Decision, request_id: str | None) -> None:
        """The decision's attributes (never the subject: see operations.md)."""
        span.set_attributes(decision_attributes(d, request_id))

    @staticmethod
    def end(
        span: Span,
        status: int | None,
        error: str | None = None,
        at: float | None = None,
        client: bool = False,
    ) -> None:
        """End a request's span: the answer's status (5xx an error; 4xx too on
        a client span, as the HTTP conventions say), or the error that ended
        it; `at`: when (time.time()), else now."""
        if status:
            span.set_attribute("http.response.status_code", status)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
            span.set_attribute("error.type", error)
        elif status and (status >= 500 or (client and status >= 400)):
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(status))
        span.end(None if at is None else int(at * 1e9))

    @staticmethod
    def failed(span: Span | None, why: str) -> None:
        """Mark the work of `span` (from `traced`) as failed."""
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, why))

    def flush(self, timeout: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout * 1000))

    def shutdown(self, wait: float = SHUTDOWN_SECONDS) -> None:
        """Export what is queued and stop, waiting `wait` seconds at most: a
        collector that is away (the exporter retries for up to its timeout,
        10 s) must not hold up a gateway that stops."""
        done = threading.Thread(
            target=self.provider.shutdown, name="authgate-otel-stop", daemon=True
        )
        done.start()
        done.join(wait)
        if done.is_alive():
            logger.warning(
                f"authgate: the collector at {self.endpoint} took more than {wait:g} s; "
                "the last spans may be lost"
            )


def decision_attributes(d: Decision, request_id: str | None) -> dict[str, str | int | bool]:
    """What a span says of a decision: the rule, the outcome, the reason, the
    status (what the gateway answered, or would have in report mode; 0 when
    forwarded), the request id that joins the span to the decision log."""
    out: dict[str, str | int | bool] = {
        "authgate.decision": d.outcome,
        "authgate.reason": d.reason,
        "authgate.status": d.status,
    }
    if d.rule:
        out["authgate.rule"] = d.rule
    if d.via:
        out["authgate.via"] = d.via
    if d.client_ip:
        out["client.address"] = d.client_ip
    if d.path is not None:
        out["url.path"] = d.path.path
    if request_id:
        out["authgate.request_id"] = request_id
    return out
