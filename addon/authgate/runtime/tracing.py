"""OpenTelemetry traces, the switch: whether a door traces, and the one helper
the rest of the package uses to trace a piece of work. Nothing here imports
OpenTelemetry; `authgate.runtime.otel` (which does) is imported only by
`open_tracing`, when `authgate_otlp` / `--otlp` names a collector. With
tracing off (the default) the gateway's only cost is a `tracing is None` test
where a span would start.

For a new kind of outgoing fetch (token introspection, say) wrap the call:

    with traced(house.tracing, "authgate.introspection", {"url.full": url}) as span:
        ...                      # the HTTP call (in a thread: the span follows)
        if failed and span is not None:
            span.set_status(ERROR, why)   # or raise: the span records it

The span is a child of the request's decision span (asyncio tasks and
`asyncio.to_thread` carry the current span along), or a trace of its own for
background work.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from authgate.runtime.otel import Tracing

# What a span's attributes may hold.
Attributes = Mapping[str, str | bool | int | float]
# The OTLP/HTTP path for traces (OTLP specification, "OTLP/HTTP Request").
TRACES_PATH = "/v1/traces"
_NOTHING: contextlib.nullcontext[None] = contextlib.nullcontext()
EXTRA = "pip install 'authgate[otel]'"


def traces_url(text: str) -> str:
    """The collector's address, `http(s)://HOST:PORT[/PATH]`, as the URL spans
    are posted to: `/v1/traces` is added unless the path ends with it (as the
    SDK does with OTEL_EXPORTER_OTLP_ENDPOINT). Raises ValueError."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"expected the collector's OTLP/HTTP address, http(s)://HOST:PORT (its "
            f"port is 4318 by default), not {text!r}"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(
            f"{text!r}: no user, query or fragment (headers for the collector go in "
            "OTEL_EXPORTER_OTLP_HEADERS)"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    path = parts.path.rstrip("/")
    if not path.endswith(TRACES_PATH):
        path += TRACES_PATH
    return parts._replace(path=path).geturl()


def check_tracing(url: str) -> str:
    """`traces_url(url)`, once the optional dependencies are known to be
    installed (found, not imported). Raises ValueError."""
    endpoint = traces_url(url)
    for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ValueError(f"tracing needs OpenTelemetry ({module} is not installed): {EXTRA}")
    return endpoint


def open_tracing(url: str, door: str) -> Tracing:
    """Tracing to the collector at `url` (see `traces_url`) for `door`
    ("gateway" or "service"). Raises ValueError: a bad address, or the
    optional dependencies are not installed."""
    endpoint = traces_url(url)
    try:
        from authgate.runtime.otel import Tracing
    except ImportError as e:
        raise ValueError(
            f"tracing needs OpenTelemetry, which is not installed ({e.name or e}): {EXTRA}"
        ) from None
    return Tracing(endpoint, door)


def traced(
    tracing: Tracing | None, name: str, attributes: Attributes | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A span for some work, child of the current span, while the `with` block
    runs; an exception leaving the block is recorded on it (status ERROR).
    With tracing off, nothing (the block gets None)."""
    if tracing is None:
        return _NOTHING
    return tracing.span(name, attributes)
