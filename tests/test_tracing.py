"""OpenTelemetry traces (`authgate_otlp` / `--otlp`), docs/operations.md#traces.

- The pure parts as tables: the collector's address, the incoming W3C trace
  context, what a span says of a decision.
- Real gateways (the lean master `authgate run` builds, in a thread) in front
  of the recording backend, their spans caught by the SDK's in-memory
  exporter: the spans and their parents, the client's `traceparent` continued
  (trusted proxy) or only linked (anyone else), the backend's `traceparent`
  naming the forward span, the store's round trip on a real redis-server, a
  key-set fetch from a real HTTP server, bcrypt, a backend that is down.
- End to end: `authgate run --otlp` and `authgate serve --otlp` as processes,
  exporting over OTLP/HTTP to a receiver the test runs: a plain HTTP server
  that decodes each export with the official `opentelemetry-proto` classes
  (no collector can be installed from a package registry here: see
  docs/development.md). With tracing off, the gateway process imports no
  OpenTelemetry module at all (Python's own import log says so).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authgate.core.decision import Decision
from authgate.core.identity import Identity
from authgate.proxy.addon import Gateway
from authgate.runtime.otel import Tracing, decision_attributes, incoming
from authgate.runtime.tracing import check_tracing, traces_url
from authgate.tools.keys import jwks_for, mint, new_rsa_key
from conftest import (
    POLICIES,
    REQUEST_SECONDS,
    START_SECONDS,
    UNBUFFERED_ENV,
    Backend,
    RunningGateway,
    send,
    wait_until,
)
from redis_server import RedisServer
from test_startup import free_port

BIN = Path(sys.executable).parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACESTATE = "vendor=opaque,other=x"
# A sampled traceparent; flags 03 add "random trace id" (W3C Trace Context level 2).
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[13]$")


def names(traceparents: list[str]) -> tuple[str, str]:
    """(trace id, parent id) of the one well-formed, sampled traceparent."""
    assert len(traceparents) == 1, traceparents
    found = _TRACEPARENT.match(traceparents[0])
    assert found is not None, traceparents
    return found.group(1), found.group(2)


# --- the pure parts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "given,url",
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
        ("https://otel.example", "https://otel.example/v1/traces"),
        ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces"),
        ("http://[::1]:4318/otlp", "http://[::1]:4318/otlp/v1/traces"),
        (" http://127.0.0.1:4318 ", "http://127.0.0.1:4318/v1/traces"),
    ],
)
def test_the_collector_address_becomes_the_traces_url(given: str, url: str) -> None:
    assert traces_url(given) == url


@pytest.mark.parametrize(
    "given,message",
    [
        ("127.0.0.1:4318", "http(s)://HOST:PORT"),
        ("grpc://127.0.0.1:4317", "http(s)://HOST:PORT"),
        ("http://", "http(s)://HOST:PORT"),
        ("http://user:pw@127.0.0.1:4318", "OTEL_EXPORTER_OTLP_HEADERS"),
        ("http://127.0.0.1:4318/?x=1", "no user, query or fragment"),
        ("http://127.0.0.1:99999", "Port out of range"),
    ],
)
def test_a_bad_collector_address_is_refused(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        traces_url(given)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_tracing(given)


@pytest.mark.parametrize(
    "traceparents,tracestates,expected",
    [
        ([TRACEPARENT], [], (TRACE_ID, PARENT_ID, "")),
        ([TRACEPARENT], ["a=1", "b=2"], (TRACE_ID, PARENT_ID, "a=1,b=2")),
        ([TRACEPARENT.upper()], [], None),  # W3C: lower-case hex only
        ([TRACEPARENT, TRACEPARENT], [], None),  # two: neither is believed
        ([], ["a=1"], None),
        (["00-" + "0" * 32 + "-00f067aa0ba902b7-01"], [], None),  # all-zero trace id
        ([f"00-{TRACE_ID}-{'0' * 16}-01"], [], None),  # all-zero parent id
        ([f"ff-{TRACE_ID}-{PARENT_ID}-01"], [], None),  # version ff is invalid
        ([f"00-{TRACE_ID}-{PARENT_ID}"], [], None),
        (["garbage"], [], None),
    ],
)
def test_the_incoming_trace_context(
    traceparents: list[str], tracestates: list[str], expected: tuple[str, str, str] | None
) -> None:
    found = incoming(traceparents, tracestates)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        got = (f"{found.trace_id:032x}", f"{found.span_id:016x}", found.trace_state.to_header())
        assert got == expected


def test_a_span_says_the_decision_but_never_the_subject() -> None:
    identity = Identity("alice@example.com", "iss", "jwt", frozenset({"admin"}), frozenset(), {})
    d = Decision(True, 0, "allowed", rule="profile", client_ip="10.1.2.3",
                 identity=identity, via="authorization")  # fmt: skip
    attributes = decision_attributes(d, "rid-1")
    assert attributes == {
        "authgate.decision": "allow",
        "authgate.reason": "allowed",
        "authgate.status": 0,
        "authgate.rule": "profile",
        "authgate.via": "authorization",
        "client.address": "10.1.2.3",
        "authgate.request_id": "rid-1",
    }
    denied = Decision(False, 403, "forbidden", rule="admin", identity=identity, report=True)
    attributes = decision_attributes(denied, None)
    assert attributes["authgate.decision"] == "would_deny"
    assert attributes["authgate.status"] == 403
    assert "alice@example.com" not in json.dumps(attributes)


# --- real gateways, spans in memory ------------------------------------------------------


def policy_file(tmp: Path, trusted: str = "[127.0.0.1]", more: str = "") -> Path:
    """The demo issuer (its key file), /api/profile for a token, /health for
    anyone; `trusted`: client_ip.trusted_proxies."""
    text = f"""version: 1
client_ip:
  trusted_proxies: {trusted}
authn:
  jwt:
    - name: demo
      issuer: https://issuer.example
      audience: api
      algorithms: [RS256]
      jwks_file: {POLICIES / "keys" / "jwks.json"}
{more}rules:
  - name: profile
    match: {{path: /api/profile}}
    allow: authenticated
  - name: health
    match: {{path: /health}}
    allow: anyone
"""
    path = tmp / "policy.yaml"
    path.write_text(text)
    return path


class Spans:
    """The spans a gateway ended, by name."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()

    def tracing(self, door: str = "gateway") -> Tracing:
        return Tracing("memory", door, SimpleSpanProcessor(self.exporter))

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.all() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, (name, [s.name for s in self.all()])
        return found[0]

    def wait(self, name: str, count: int = 1) -> list[ReadableSpan]:
        wait_until(lambda: len(self.named(name)) >= count, REQUEST_SECONDS, what=f"span {name}")
        return self.named(name)


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def ids(span: ReadableSpan) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


@pytest.fixture
def traced(backend: Backend) -> Iterator[Callable[..., tuple[RunningGateway, Spans]]]:
    """traced(policy, *sets, upstream=URL) -> a running gateway whose spans go to
    memory (the gateway's Tracing, with the in-memory exporter in place of OTLP)."""
    running: list[RunningGateway] = []

    def start(
        policy: Path, *sets: str, upstream: str | None = None
    ) -> tuple[RunningGateway, Spans]:
        spans = Spans()
        gateway = Gateway()
        g = RunningGateway(policy, upstream or backend.url, list(sets), gateway)
        running.append(g)
        gateway.house.tracing = gateway.house.fetcher.tracing = spans.tracing()
        return g, spans

    yield start
    for g in running:
        g.stop()


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def test_an_allowed_request_continues_a_trusted_traceparent_to_the_backend(
    traced: Callable[..., tuple[RunningGateway, Spans]],
    backend: Backend,
    tmp_path: Path,
    token: Callable[..., str],
) -> None:
    gw, spans = traced(policy_file(tmp_path))
    headers = [bearer(token()), ("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)]
    assert send(gw.address, "GET", "/api/profile", headers).status == 200
    (request,) = spans.wait("authgate.request")
    decision, forward = spans.one("authgate.decision"), spans.one("authgate.forward")

    # The client's trace, continued: its span is the request span's parent.
    assert ids(request)[0] == TRACE_ID
    assert f"{parent_of(request):016x}" == PARENT_ID
    assert request.kind is SpanKind.SERVER and forward.kind is SpanKind.CLIENT
    assert parent_of(decision) == request.context.span_id
    assert parent_of(forward) == request.context.span_id
    assert {ids(s)[0] for s in spans.all()} == {TRACE_ID}
    assert not request.links

    # The backend got a traceparent naming the forward span, and the tracestate.
    (seen,) = backend.seen
    assert seen.header_all("traceparent") == [f"00-{TRACE_ID}-{ids(forward)[1]}-01"]
    assert seen.header_all("tracestate") == [TRACESTATE]

    assert request.attributes is not None and decision.attributes is not None
    assert decision.attributes["authgate.rule"] == "profile"
    assert decision.attributes["authgate.decision"] == "allow"
    assert decision.attributes["authgate.reason"] == "allowed"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["authgate.request_id"] == seen.header("x-request-id")
    assert request.attributes["url.path"] == "/api/profile"
    assert forward.attributes is not None
    assert forward.attributes["http.response.status_code"] == 200
    assert forward.attributes["server.port"] == int(backend.url.rsplit(":", 1)[1])
    # The subject (alice) is in no span.
    assert "alice" not in json.dumps([dict(s.attributes or {}) for s in spans.all()])
    # In time: the decision, then the forward, inside the request.
    assert request.start_time is not None and request.end_time is not None
    assert decision.start_time is not None and decision.end_time is not None
    assert forward.start_time is not None and forward.end_time is not None
    assert request.start_time <= decision.start_time <= decision.end_time <= forward.start_time
    assert forward.end_time <= request.end_time
    assert request.status.status_code is StatusCode.UNSET


def test_an_untrusted_client_s_traceparent_is_linked_not_continued(
    traced: Callable[..., tuple[RunningGateway, Spans]],
    backend: Backend,
    tmp_path: Path,
    token: Callable[..., str],
) -> None:
    gw, spans = traced(policy_file(tmp_path, trusted="[]"))
    headers = [bearer(token()), ("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)]
    assert send(gw.address, "GET", "/api/profile", headers).status == 200
    (request,) = spans.wait("authgate.request")
    forward = spans.one("authgate.forward")
    trace_id = ids(request)[0]
    assert trace_id != TRACE_ID and request.parent is None
    (link,) = request.links
    assert (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") == (
        TRACE_ID,
        PARENT_ID,
    )
    # The backend is told the gateway's trace, not the client's (nor its tracestate).
    (seen,) = backend.seen
    assert names(seen.header_all("traceparent")) == (trace_id, ids(forward)[1])
    assert seen.header_all("tracestate") == []


def test_a_request_without_traceparent_starts_a_trace(
    traced: Callable[..., tuple[RunningGateway, Spans]], backend: Backend, tmp_path: Path
) -> None:
    gw, spans = traced(policy_file(tmp_path))
    assert send(gw.address, "GET", "/health").status == 200
    (request,) = spans.wait("authgate.request")
    assert request.parent is None and not request.links
    found = names(backend.seen[0].header_all("traceparent"))
    assert found == ids(spans.one("authgate.forward"))
    assert found[0] == ids(request)[0]


def test_a_denial_has_no_forward_span_and_is_not_an_error(
    traced: Callable[..., tuple[RunningGateway, Spans]], backend: Backend, tmp_path: Path
) -> None:
    gw, spans = traced(policy_file(tmp_path))
    headers = [("traceparent", TRACEPARENT)]
    assert send(gw.address, "GET", "/api/profile", headers).status == 401
    assert send(gw.address, "GET", "/nothing", headers).status == 404
    requests = spans.wait("authgate.request", 2)
    assert backend.seen == []
    assert spans.named("authgate.forward") == []
    by_status = {r.attributes["http.response.status_code"]: r for r in requests if r.attributes}
    assert set(by_status) == {401, 404}
    for status, reason in ((401, "no_credentials"), (404, "no_rule")):
        request = by_status[status]
        assert request.status.status_code is StatusCode.UNSET  # a 4xx is the client's
        assert request.attributes is not None
        assert request.attributes["authgate.reason"] == reason
        assert request.attributes["authgate.decision"] == "deny"
    decisions = spans.named("authgate.decision")
    assert {parent_of(d) for d in decisions} == {r.context.span_id for r in requests}


def test_with_tracing_off_the_client_s_traceparent_passes_untouched(
    start_gateway: Callable[..., RunningGateway], backend: Backend, tmp_path: Path
) -> None:
    gw = start_gateway(policy_file(tmp_path))
    assert gw.addon.house.tracing is None
    headers = [("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)]
    assert send(gw.address, "GET", "/health", headers).status == 200
    (seen,) = backend.seen
    assert seen.header_all("traceparent") == [TRACEPARENT]
    assert seen.header_all("tracestate") == [TRACESTATE]


def test_a_backend_that_is_down_ends_the_forward_span_in_error(
    traced: Callable[..., tuple[RunningGateway, Spans]], tmp_path: Path
) -> None:
    gw, spans = traced(policy_file(tmp_path), upstream=f"http://127.0.0.1:{free_port()}")
    assert send(gw.address, "GET", "/health").status == 502
    (request,) = spans.wait("authgate.request")
    forward = spans.one("authgate.forward")
    assert parent_of(forward) == request.context.span_id
    for span in (forward, request):
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None and span.attributes["error.type"]


def test_a_streamed_body_s_request_carries_the_traceparent_too(
    traced: Callable[..., tuple[RunningGateway, Spans]], backend: Backend, tmp_path: Path
) -> None:
    """stream_large_bodies: the headers go to the backend before the body has
    come, so the forward span starts as the request is judged."""
    gw, spans = traced(policy_file(tmp_path), "stream_large_bodies=1k")
    assert send(gw.address, "POST", "/health", body=b"x" * 20_000).status == 200
    spans.wait("authgate.request")
    forward = spans.one("authgate.forward")
    (seen,) = backend.seen
    assert names(seen.header_all("traceparent")) == ids(forward)


def test_the_store_round_trip_is_a_span_under_the_decision(
    traced: Callable[..., tuple[RunningGateway, Spans]],
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    limits = "limits:\n  - {name: per-ip, key: ip, rate: 1/minute}\n"
    gw, spans = traced(policy_file(tmp_path, more=limits), f"authgate_store={redis_server.url}")
    try:
        assert send(gw.address, "GET", "/health").status == 200
        assert send(gw.address, "GET", "/health").status == 429
    finally:
        shared, loop = gw.addon.house.shared, gw.loop
        assert shared is not None and loop is not None
        asyncio.run_coroutine_threadsafe(shared.close(), loop).result(REQUEST_SECONDS)
    stores = spans.wait("authgate.store", 2)
    decisions = {d.context.span_id: d for d in spans.wait("authgate.decision", 2)}
    for store in stores:
        assert parent_of(store) in decisions
        assert store.attributes is not None
        assert store.attributes["db.system.name"] == "redis"
        assert store.attributes["authgate.store.limits"] == 1
    assert sorted(s.attributes["authgate.store.refused"] for s in stores if s.attributes) == [0, 1]
    # The store's span lies inside its decision's.
    for store in stores:
        decision = decisions[parent_of(store) or 0]
        assert decision.start_time is not None and store.start_time is not None
        assert decision.start_time <= store.start_time
        assert store.end_time is not None and decision.end_time is not None
        assert store.end_time <= decision.end_time


def test_a_key_fetch_a_request_starts_is_traced_under_its_decision(
    traced: Callable[..., tuple[RunningGateway, Spans]], tmp_path: Path
) -> None:
    from test_jwks import KeyServer

    key1, key2 = new_rsa_key(), new_rsa_key()
    keys = KeyServer()
    try:
        keys.serve("/jwks", {"keys": jwks_for(key1, "k1")["keys"]})
        issuer = "https://idp.test"
        text = f"""version: 1
authn:
  jwt:
    - name: idp
      issuer: {issuer}
      audience: api
      algorithms: [RS256]
      jwks_url: {keys.url}/jwks
      jwks_refresh_cooldown: 1s
rules:
  - name: api
    match: {{path: /api/**}}
    allow: authenticated
"""
        policy = tmp_path / "idp.yaml"
        policy.write_text(text)
        gw, spans = traced(policy)
        # A request waits for a fetch 1 s at most: on a busy machine, longer.
        gw.addon.house.fetcher.wait = REQUEST_SECONDS
        wait_until(lambda: gw.addon.house.ready().ready, START_SECONDS, what="the first keys")
        # A new signing key: its first token makes the request fetch the set again.
        keys.serve("/jwks", {"keys": jwks_for(key1, "k1")["keys"] + jwks_for(key2, "k2")["keys"]})
        new = mint(key2, sub="bob", iss=issuer, aud="api", kid="k2")
        assert send(gw.address, "GET", "/api/x", [bearer(new)]).status == 200
    finally:
        keys.stop()
    spans.wait("authgate.request")
    decision, wait = spans.one("authgate.decision"), spans.one("authgate.key_set.wait")
    fetches = spans.named("authgate.key_set.fetch")
    (fetch,) = [
        f for f in fetches if f.attributes and f.attributes["authgate.fetch.reason"] != "scheduled"
    ]
    # The refresher's own fetch at start (if it ran once tracing was on) is a trace of its own.
    assert all(f.parent is None for f in fetches if f is not fetch)
    assert parent_of(wait) == decision.context.span_id
    assert parent_of(fetch) == wait.context.span_id
    assert fetch.attributes is not None and wait.attributes is not None
    assert fetch.attributes["url.full"] == f"{keys.url}/jwks"
    assert fetch.attributes["authgate.fetch.reason"] == "unknown kid"
    assert fetch.attributes["authgate.keys"] == 2
    assert wait.attributes["authgate.fetch.waited_out"] is False
    assert fetch.status.status_code is StatusCode.UNSET


def test_a_bcrypt_check_is_a_span_under_the_decision(
    traced: Callable[..., tuple[RunningGateway, Spans]], tmp_path: Path
) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (tmp_path / "users.htpasswd").write_text(f"carol:{hashed}\n")
    more = "  basic: {htpasswd: users.htpasswd}\n"
    policy = policy_file(tmp_path, more="")
    text = policy.read_text().replace("authn:\n", "authn:\n" + more)
    text += "  - name: basic\n    match: {path: /basic}\n    allow: authenticated\n"
    text += "    accept: [basic]\n"
    policy.write_text(text)
    gw, spans = traced(policy)
    basic = ("Authorization", "Basic Y2Fyb2w6cHc=")  # carol:pw
    assert send(gw.address, "GET", "/basic", [basic]).status == 200
    spans.wait("authgate.request")
    check, decision = spans.one("authgate.password_check"), spans.one("authgate.decision")
    assert parent_of(check) == decision.context.span_id
    assert "carol" not in json.dumps([dict(s.attributes or {}) for s in spans.all()])


# --- end to end: OTLP/HTTP to a receiver ------------------------------------------------


@dataclass
class Received:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status: int
    links: list[tuple[str, str]]
    resource: dict[str, Any]


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@dataclass
class Receiver:
    """An OTLP/HTTP endpoint on 127.0.0.1 (POST /v1/traces, protobuf, gzip or
    not), decoding each export with the official opentelemetry-proto classes."""

    spans: list[Received] = field(default_factory=list)
    posts: list[tuple[str, str]] = field(default_factory=list)  # (path, content type)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, body: bytes) -> None:
        export = ExportTraceServiceRequest.FromString(body)
        for rs in export.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    received = Received(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        s.kind, {a.key: _value(a.value) for a in s.attributes},
                        s.status.code,
                        [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        resource,
                    )  # fmt: skip
                    with self.lock:
                        self.spans.append(received)

    def named(self, name: str) -> list[Received]:
        with self.lock:
            return [s for s in self.spans if s.name == name]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            r.posts.append((self.path, self.headers.get("Content-Type", "")))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            r.take(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    r.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    r.server.daemon_threads = True
    threading.Thread(target=r.server.serve_forever, daemon=True).start()
    yield r
    r.server.shutdown()
    r.server.server_close()


class Process:
    """`authgate run` or `authgate serve` with Python's import log
    (PYTHONPROFILEIMPORTTIME: every module the process imports, whenever)."""

    def __init__(self, tmp: Path, args: list[str], name: str) -> None:
        self.log = tmp / f"{name}.out"
        self._out = self.log.open("w")
        # Spans leave the batch every 100 ms (the SDK's own variable; 5 s by default).
        env = dict(UNBUFFERED_ENV, PYTHONPROFILEIMPORTTIME="1", OTEL_BSP_SCHEDULE_DELAY="100")
        env.pop("OTEL_SERVICE_NAME", None)
        self.proc = subprocess.Popen(
            [str(BIN / "authgate"), *args], stdout=self._out, stderr=subprocess.STDOUT, env=env
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str) -> None:
        def said() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}: {self.output()[-3000:]}")
            return text in self.output()

        wait_until(said, START_SECONDS, every=0.1, what=text)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(START_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode

    def imported(self, prefix: str) -> list[str]:
        """The modules the process imported whose name starts with `prefix`."""
        found = re.findall(r"^import time:.*\|\s*(\S+)$", self.output(), re.MULTILINE)
        return [m.strip() for m in found if m.strip().startswith(prefix)]


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    running: list[Process] = []
    yield running
    for p in running:
        p.stop()


def run_gateway(
    processes: list[Process], tmp: Path, policy: Path, upstream: str, *args: str
) -> tuple[Process, int]:
    port = free_port()
    p = Process(tmp, ["run", "--policy", str(policy), "--upstream", upstream,
                      "--listen", f"127.0.0.1:{port}", *args], f"run{len(processes)}")  # fmt: skip
    processes.append(p)
    p.wait_for(f"listening on http://127.0.0.1:{port}")
    return p, port


def test_authgate_run_exports_its_spans_over_otlp_http(
    processes: list[Process],
    receiver: Receiver,
    backend: Backend,
    tmp_path: Path,
    token: Callable[..., str],
) -> None:
    policy = policy_file(tmp_path)
    gw, port = run_gateway(processes, tmp_path, policy, backend.url, "--otlp", receiver.url)
    address = ("127.0.0.1", port)
    headers = [bearer(token()), ("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)]
    assert send(address, "GET", "/api/profile", headers).status == 200
    denied_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert send(address, "GET", "/api/profile", [("traceparent", denied_parent)]).status == 401
    assert len(backend.seen) == 1  # the 401 reached nothing

    wait_until(lambda: len(receiver.named("authgate.request")) == 2, what="both requests' spans")
    wait_until(lambda: len(receiver.named("authgate.forward")) == 1, what="the forward span")
    assert {p for p in receiver.posts} == {("/v1/traces", "application/x-protobuf")}

    allowed = next(s for s in receiver.named("authgate.request") if s.trace_id == TRACE_ID)
    assert allowed.parent_id == PARENT_ID
    assert allowed.kind == 2  # SPAN_KIND_SERVER
    assert allowed.attributes["authgate.rule"] == "profile"
    assert allowed.attributes["authgate.decision"] == "allow"
    assert allowed.attributes["http.response.status_code"] == 200
    assert allowed.resource["service.name"] == "authgate"
    assert allowed.resource["authgate.door"] == "gateway"
    decision = next(s for s in receiver.named("authgate.decision") if s.trace_id == TRACE_ID)
    (forward,) = receiver.named("authgate.forward")
    assert decision.parent_id == allowed.span_id
    assert (forward.trace_id, forward.parent_id, forward.kind) == (TRACE_ID, allowed.span_id, 3)
    (seen,) = backend.seen
    assert seen.header_all("traceparent") == [f"00-{TRACE_ID}-{forward.span_id}-01"]
    assert seen.header_all("tracestate") == [TRACESTATE]

    denied = next(s for s in receiver.named("authgate.request") if s.trace_id != TRACE_ID)
    assert denied.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert denied.attributes["http.response.status_code"] == 401
    assert denied.attributes["authgate.reason"] == "no_credentials"
    assert denied.status == 0  # STATUS_CODE_UNSET: a 4xx is not the gateway's error
    assert "alice" not in json.dumps([s.attributes for s in receiver.spans])

    assert gw.imported("opentelemetry.sdk.trace")  # the control for the test below
    assert gw.stop() == 0


def test_with_tracing_off_the_gateway_imports_no_opentelemetry(
    processes: list[Process], backend: Backend, tmp_path: Path, token: Callable[..., str]
) -> None:
    gw, port = run_gateway(processes, tmp_path, policy_file(tmp_path), backend.url)
    headers = [bearer(token()), ("traceparent", TRACEPARENT)]
    assert send(("127.0.0.1", port), "GET", "/api/profile", headers).status == 200
    assert backend.seen[0].header_all("traceparent") == [TRACEPARENT]
    assert gw.stop() == 0
    assert gw.imported("authgate.proxy.addon")  # the log is there...
    assert gw.imported("opentelemetry") == []  # ...and names no OpenTelemetry module


def test_an_unreachable_collector_slows_and_breaks_nothing(
    processes: list[Process], backend: Backend, tmp_path: Path
) -> None:
    away = f"http://127.0.0.1:{free_port()}"
    gw, port = run_gateway(processes, tmp_path, policy_file(tmp_path), backend.url, "--otlp", away)
    start = time.monotonic()
    statuses = [send(("127.0.0.1", port), "GET", "/health").status for _ in range(20)]
    took = time.monotonic() - start
    assert statuses == [200] * 20
    assert took < 10, took  # each request waits for nothing of the export
    # Exports fail in the exporter's thread (every 100 ms here): the gateway
    # goes on answering, and stops in time.
    wait_until(lambda: "v1/traces" in gw.output(), what="the failed export logged")
    assert send(("127.0.0.1", port), "GET", "/health").status == 200
    start = time.monotonic()
    assert gw.stop() == 0
    # The last spans' export is given SHUTDOWN_SECONDS (3 s), not the
    # exporter's 10 s of retries; the rest is the process's own exit.
    assert time.monotonic() - start < 15


@pytest.mark.parametrize(
    "args,message",
    [
        (["--otlp", "127.0.0.1:4318"], "http(s)://HOST:PORT"),
        (["--otlp", "http://127.0.0.1:4318/?q"], "no user, query or fragment"),
    ],
)
@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_bad_otlp_address_stops_either_door_at_start(
    command: str, args: list[str], message: str, tmp_path: Path
) -> None:
    more = ["--upstream", "http://127.0.0.1:9"] if command == "run" else []
    proc = subprocess.run(
        [str(BIN / "authgate"), command, "--policy", str(policy_file(tmp_path)),
         "--listen", f"127.0.0.1:{free_port()}", *more, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize("command", ["run", "serve"])
def test_every_worker_is_told_the_collector(command: str) -> None:
    """`--workers N --otlp URL`: each worker process exports its own spans."""
    from authgate.cli import parser
    from authgate.tools import commands

    more = ["--upstream", "http://127.0.0.1:9"] if command == "run" else []
    args = parser().parse_args(
        [command, "--policy", "p.yaml", *more, "--workers", "2", "--otlp", "http://c:4318"]
    )
    worker = commands._worker_argv if command == "run" else commands._service_worker_argv
    argv = worker(args)
    assert argv[argv.index("--otlp") + 1] == "http://c:4318"
    assert "--workers" not in argv
    assert parser().parse_args([command, *argv]).otlp == "http://c:4318"


def test_the_decision_service_continues_the_proxy_s_trace(
    processes: list[Process], receiver: Receiver, tmp_path: Path, token: Callable[..., str]
) -> None:
    port = free_port()
    policy = policy_file(tmp_path)
    service = Process(tmp_path, ["serve", "--policy", str(policy), "--listen",
                                 f"127.0.0.1:{port}", "--otlp", receiver.url], "serve")  # fmt: skip
    processes.append(service)
    service.wait_for(f"decision service on http://127.0.0.1:{port}")
    address = ("127.0.0.1", port)
    check = [
        ("X-Forwarded-Method", "GET"),
        ("X-Forwarded-Uri", "/api/profile"),
        ("traceparent", TRACEPARENT),
    ]
    assert send(address, "GET", "/auth", [*check, bearer(token())]).status == 200
    # Envoy's check request: the original request's method, path and fields.
    envoy = [("traceparent", TRACEPARENT)]
    assert send(address, "GET", "/envoy/api/profile", envoy).status == 401
    wait_until(lambda: len(receiver.named("authgate.check")) == 2, what="both checks' spans")
    checks = receiver.named("authgate.check")
    decisions = receiver.named("authgate.decision")
    assert {(c.trace_id, c.parent_id) for c in checks} == {(TRACE_ID, PARENT_ID)}
    assert {d.parent_id for d in decisions} == {c.span_id for c in checks}
    by_door = {c.attributes["authgate.check"]: c for c in checks}
    assert by_door["auth"].attributes["authgate.decision"] == "allow"
    assert by_door["auth"].attributes["http.response.status_code"] == 200
    assert by_door["envoy"].attributes["authgate.reason"] == "no_credentials"
    assert by_door["envoy"].attributes["http.response.status_code"] == 401
    assert by_door["auth"].resource["authgate.door"] == "service"
    assert service.imported("opentelemetry.exporter.otlp")
    assert service.stop() == 0
