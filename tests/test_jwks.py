"""JWKS over HTTP: `authgate.runtime.jwks` against a real HTTP server on 127.0.0.1.

The server serves documents the test controls (swap keys, set Cache-Control,
answer 500, stop) and counts requests; time is a fake clock injected into
`RemoteKeys`.

Conformance checks: J-11 (an unknown kid triggers at most one rate-limited
JWKS refresh), J-12 (keys of unknown type / for encryption are skipped),
Part 1 §11 (keys unavailable -> 503 with Retry-After, never 401).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authgate.core.keyset import RemoteKeys, check_url, max_age
from authgate.core.tokens import Issuer, KeysUnavailable, TokenRejected, verify
from authgate.runtime.jwks import MAX_BODY, Fetcher, FetchError, Get, http_get, refresh_sync
from authgate.tools.keys import jwks_for, mint, new_rsa_key

P = pytest.param
NOW = 1_800_000_000.0  # token time; RemoteKeys runs on the fake clock below
ISS = "https://as.test"
AUD = "https://api.test"
KEY1 = new_rsa_key()
KEY2 = new_rsa_key()


def jwks(*pairs: tuple[Any, str]) -> dict[str, Any]:
    return {"keys": [jwks_for(key, kid)["keys"][0] for key, kid in pairs]}


JWKS1 = jwks((KEY1, "k1"))
JWKS2 = jwks((KEY2, "k2"))


# --- the key server ------------------------------------------------------------------------


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class KeyServer:
    """An HTTP server in a thread serving `routes`; counts GETs per path."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.accept: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                server.accept.append(self.headers.get("Accept"))
                route = server.routes.get(self.path, Route(404, b"not found"))
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(route.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(route.body)
                except OSError:
                    pass  # the client stopped reading (oversized body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()
        self.running = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve(
        self,
        path: str,
        doc: Any,
        *,
        status: int = 200,
        cache_control: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        if cache_control is not None:
            h["Cache-Control"] = cache_control
        self.routes[path] = Route(status, body, h)

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[KeyServer]:
    s = KeyServer()
    yield s
    s.stop()


@dataclass
class Clock:
    now: float = 1000.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(clock: Clock) -> Callable[..., RemoteKeys]:
    """make(url, **kw) -> RemoteKeys on the fake clock (min 300 s, max 3600 s, cooldown 30 s)."""

    def build(url: str | None, **kw: Any) -> RemoteKeys:
        kw.setdefault("issuer", ISS)
        kw.setdefault("discovery", False)
        kw.setdefault("pinned", frozenset({"RS256"}))
        kw.setdefault("min_ttl", 300)
        kw.setdefault("max_ttl", 3600)
        kw.setdefault("cooldown", 30)
        get = kw.pop("get", http_get)
        source = RemoteKeys(url=url, clock=lambda: clock.now, **kw)
        GETS[id(source)] = get
        return source

    return build


GETS: dict[int, Get] = {}  # the fetch function each test's key set uses


def fetcher(source: RemoteKeys) -> Fetcher:
    return Fetcher(get=GETS.get(id(source), http_get))


def refresh(source: RemoteKeys, kid: str | None = None) -> None:
    f = fetcher(source)
    asyncio.run(f.refresh(source, "unknown kid", kid) if kid else f.refresh(source))


def kids(source: RemoteKeys) -> list[str | None]:
    return [k.kid for k in source.keys]


def issuer_for(source: RemoteKeys) -> Issuer:
    return Issuer(
        "remote",
        ISS,
        (AUD,),
        frozenset({"RS256"}),
        (),
        0.0,
        ("roles",),
        ("scope",),
        True,
        remote=source,
    )


def token(key: Any, kid: str) -> str:
    return mint(key, sub="alice", iss=ISS, aud=AUD, kid=kid, now=NOW)


# --- loading, TTL ------------------------------------------------------------------------


def test_first_refresh_loads_the_keys(server: KeyServer, make: Callable[..., RemoteKeys]) -> None:
    server.serve("/jwks", JWKS1, cache_control="max-age=600")
    source = make(f"{server.url}/jwks")
    assert (source.loaded, source.keys, source.due()) == (False, (), True)
    refresh(source)
    assert source.loaded is True
    assert kids(source) == ["k1"]
    assert source.keys[0].algorithms == frozenset({"RS256"})
    assert (source.fetches, server.hits["/jwks"]) == (1, 1)
    assert (source.last_error, source.failures) == (None, 0)
    assert (source.expires_at, source.next_attempt, source.last_kid_refresh) == (
        1600,
        1600,
        float("-inf"),
    )
    assert server.accept == ["application/json"]
    who = verify((issuer_for(source),), token(KEY1, "k1"), NOW)
    assert (who.subject, who.issuer) == ("alice", ISS)


def test_refresh_sync_loads_the_keys(server: KeyServer, make: Callable[..., RemoteKeys]) -> None:
    server.serve("/jwks", JWKS1)
    source = make(f"{server.url}/jwks")
    refresh_sync(source)
    assert (kids(source), source.loaded, server.hits["/jwks"]) == (["k1"], True, 1)


@pytest.mark.parametrize(
    ("after", "due"),
    [
        P(0, False, id="just-loaded"),
        P(599, False, id="one-second-before"),
        P(599.9, False, id="a-moment-before"),
        P(600, True, id="at-expiry"),
        P(5000, True, id="long-after"),
    ],
)
def test_due_follows_the_ttl(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock, after: float, due: bool
) -> None:
    server.serve("/jwks", JWKS1, cache_control="public, max-age=600")
    source = make(f"{server.url}/jwks")
    refresh(source)
    clock.now += after
    assert source.due() is due


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [
        P(None, 300, id="none-is-min"),
        P("max-age=600", 600, id="within"),
        P("public, max-age=600", 600, id="with-other-directives"),
        P('max-age="600"', 600, id="quoted"),
        P("MAX-AGE=600", 600, id="upper-case"),
        P("max-age=10", 300, id="clamped-to-min"),
        P("max-age=0", 300, id="zero-is-min"),
        P("max-age=999999", 3600, id="clamped-to-max"),
        P("no-store", 300, id="no-store-is-min"),
        P("no-cache", 300, id="no-cache-is-min"),
        P("no-store, max-age=600", 300, id="no-store-beats-max-age"),
        P("s-maxage=900", 300, id="s-maxage-ignored"),
        P("max-age=abc", 300, id="garbage-is-min"),
    ],
)
def test_ttl_from_cache_control(
    server: KeyServer,
    make: Callable[..., RemoteKeys],
    clock: Clock,
    cache_control: str | None,
    ttl: float,
) -> None:
    server.serve("/jwks", JWKS1, cache_control=cache_control)
    source = make(f"{server.url}/jwks")
    refresh(source)
    assert source.expires_at - clock.now == ttl
    assert source.next_attempt == source.expires_at


@pytest.mark.parametrize(
    ("value", "age"),
    [
        P(None, None, id="none"),
        P("", None, id="empty"),
        P("max-age=600", 600, id="plain"),
        P("private,max-age=60", 60, id="no-space"),
        P("max-age = 600", 600, id="spaces"),
        P("max-age=600, must-revalidate", 600, id="first-of-two"),
        P("max-age=600, max-age=10", 600, id="first-occurrence"),
        P("no-store", 0, id="no-store"),
        P("No-Cache", 0, id="no-cache-any-case"),
        P("s-maxage=600", None, id="s-maxage"),
        P("max-age=600x", None, id="trailing-garbage"),
        P("max-age=-1", None, id="negative"),
    ],
)
def test_max_age(value: str | None, age: int | None) -> None:
    assert max_age(value) == age


# --- failures: stale keys, backoff -------------------------------------------------------


def test_failed_refresh_keeps_the_stale_keys(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    server.serve("/jwks", JWKS1, cache_control="max-age=600")
    source = make(f"{server.url}/jwks")
    refresh(source)
    old = source.keys
    server.serve("/jwks", {"error": "down"}, status=500)
    clock.now = 1600
    assert source.due()
    refresh(source)
    assert source.keys is old
    assert source.loaded is True
    assert source.failures == 1
    assert source.last_error is not None and "HTTP Error 500" in source.last_error
    assert source.next_attempt == 1630  # cooldown (30 s) after the failure
    clock.now = 1629
    assert not source.due()
    clock.now = 1630
    assert source.due()
    # stale beats down: tokens still verify
    who = verify((issuer_for(source),), token(KEY1, "k1"), NOW)
    assert who.subject == "alice"
    # and a good answer later clears the failure
    server.serve("/jwks", JWKS1, cache_control="max-age=600")
    refresh(source)
    assert (source.failures, source.last_error, source.next_attempt) == (0, None, 2230)


def test_stopped_server_keeps_the_stale_keys(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    server.serve("/jwks", JWKS1)
    source = make(f"{server.url}/jwks")
    refresh(source)
    server.stop()
    clock.now = 1300
    refresh(source)
    assert kids(source) == ["k1"]
    assert source.last_error is not None and "Connection refused" in source.last_error
    assert source.next_attempt == 1330


def test_backoff_grows_and_is_capped(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    server.serve("/jwks", b"oops", status=500)
    source = make(f"{server.url}/jwks")
    waits = []
    for _ in range(8):
        refresh(source)
        waits.append(source.next_attempt - clock.now)
        clock.now = source.next_attempt
    assert waits == [30, 60, 120, 240, 300, 300, 300, 300]
    assert (source.failures, source.loaded, server.hits["/jwks"]) == (8, False, 8)


SKIPPED_EC = ec.generate_private_key(ec.SECP256R1())


def _ec_jwk() -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(SKIPPED_EC.public_key()))
    jwk.update({"kid": "e1", "use": "sig"})
    return jwk


def _enc_jwk() -> dict[str, Any]:
    jwk = dict(JWKS1["keys"][0])
    jwk.update({"use": "enc", "kid": "x1"})
    jwk.pop("alg")
    return jwk


def _private_jwk() -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY1))
    jwk["kid"] = "p1"
    return jwk


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        P(500, b"{}", "HTTP Error 500", id="server-error"),
        P(404, b"{}", "HTTP Error 404", id="not-found"),
        P(200, b"<html>", "not JSON", id="not-json"),
        P(200, b'{"kty": "RSA"}', 'not a JWKS: expected {"keys": [...]}', id="not-a-jwks"),
        P(200, b'{"keys": []}', "no key usable with ['RS256'] ()", id="empty-key-set"),
        P(
            200,
            json.dumps({"keys": [_ec_jwk()]}).encode(),
            "no key usable with ['RS256'] (key 0 (kid 'e1'): fits none of the algorithms",
            id="only-other-family",
        ),
        P(
            200,
            json.dumps({"keys": [_enc_jwk()]}).encode(),
            "no key usable with ['RS256'] (key 0 (kid 'x1'): use is 'enc', not 'sig')",
            id="only-encryption-key",
        ),
        P(
            200,
            json.dumps({"keys": [{"kty": "XYZ", "kid": "z"}]}).encode(),
            "no key usable with ['RS256']",
            id="only-unknown-kty",
        ),
        P(
            200,
            json.dumps({"keys": [_private_jwk()]}).encode(),
            "is a private key",
            id="private-key",
        ),
        P(200, b" " * (MAX_BODY + 1), f"larger than {MAX_BODY} bytes", id="oversized"),
    ],
)
def test_unusable_answer_is_a_recorded_fetch_error(
    server: KeyServer,
    make: Callable[..., RemoteKeys],
    clock: Clock,
    status: int,
    body: bytes,
    error: str,
) -> None:
    server.serve("/jwks", body, status=status)
    source = make(f"{server.url}/jwks")
    refresh(source)
    assert source.loaded is False
    assert source.keys == ()
    assert source.failures == 1
    assert source.last_error is not None
    assert source.last_error.startswith(f"{server.url}/jwks: ") or source.last_error.startswith(
        f"GET {server.url}/jwks: "
    )
    assert error in source.last_error
    assert source.next_attempt == clock.now + 30


def test_unknown_kty_beside_a_good_key_is_skipped(
    server: KeyServer, make: Callable[..., RemoteKeys]
) -> None:
    server.serve("/jwks", {"keys": [{"kty": "XYZ", "kid": "z"}, *JWKS1["keys"]]})
    source = make(f"{server.url}/jwks")
    refresh(source)
    assert (kids(source), source.last_error) == (["k1"], None)


# --- never loaded: 503, not 401 ------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "later", "retry_after"),
    [
        P(0, 0, 1, id="never-tried"),
        P(1, 0, 30, id="just-failed"),
        P(1, 10, 20, id="ten-seconds-later"),
        P(1, 29.5, 1, id="half-a-second-left"),
        P(1, 100, 1, id="overdue-still-at-least-one"),
        P(2, 0, 60, id="second-failure"),
    ],
)
def test_never_loaded_issuer_raises_keys_unavailable(
    server: KeyServer,
    make: Callable[..., RemoteKeys],
    clock: Clock,
    failures: int,
    later: float,
    retry_after: int,
) -> None:
    server.serve("/jwks", b"", status=503)
    source = make(f"{server.url}/jwks")
    for i in range(failures):
        if i:
            clock.now = source.next_attempt  # the backoff is honoured: wait it out
        refresh(source)
    clock.now += later
    issuer = issuer_for(source)
    with pytest.raises(KeysUnavailable) as caught:
        issuer.key_for("k1")
    assert caught.value.issuer == ISS
    assert caught.value.retry_after == retry_after
    assert caught.value.retry_after >= 1
    with pytest.raises(KeysUnavailable):
        verify((issuer,), token(KEY1, "k1"), NOW)
    if failures:
        assert "HTTP Error 503" in str(caught.value)


# --- rotation and unknown kids ----------------------------------------------------------


def test_key_rotation(server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock) -> None:
    server.serve("/jwks", JWKS1, cache_control="max-age=600")
    source = make(f"{server.url}/jwks")
    refresh(source)
    issuer = issuer_for(source)
    # the provider publishes k2 beside k1, then drops k1
    server.serve("/jwks", jwks((KEY1, "k1"), (KEY2, "k2")), cache_control="max-age=600")
    clock.now = 1600
    refresh(source)
    assert kids(source) == ["k1", "k2"]
    assert verify((issuer,), token(KEY2, "k2"), NOW).subject == "alice"
    server.serve("/jwks", JWKS2, cache_control="max-age=600")
    clock.now = 2200
    refresh(source)
    assert kids(source) == ["k2"]
    assert source.lookup("k1") is None
    assert source.lookup("k2") is source.keys[0]
    assert issuer.key_for("k2") is source.keys[0]
    with pytest.raises(TokenRejected) as caught:
        verify((issuer,), token(KEY1, "k1"), NOW)
    assert caught.value.reason == "The access token signing key is unknown"
    assert server.hits["/jwks"] == 3


@pytest.mark.parametrize(
    ("document", "kid", "found"),
    [
        P(JWKS1, None, "k1", id="no-kid-one-key"),
        P(jwks((KEY1, "k1"), (KEY2, "k2")), None, None, id="no-kid-two-keys"),
        P(JWKS1, "k1", "k1", id="kid"),
        P(JWKS1, "K1", None, id="kid-is-case-sensitive"),
        P(JWKS1, "k2", None, id="unknown-kid"),
    ],
)
def test_lookup(
    server: KeyServer,
    make: Callable[..., RemoteKeys],
    document: dict[str, Any],
    kid: str | None,
    found: str | None,
) -> None:
    server.serve("/jwks", document)
    source = make(f"{server.url}/jwks")
    refresh(source)
    key = source.lookup(kid)
    assert (key.kid if key is not None else None) == found


def test_unknown_kid_refresh_cooldown_and_negative_cache(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    server.serve("/jwks", JWKS1, cache_control="max-age=3600")
    source = make(f"{server.url}/jwks")
    refresh(source)  # at 1000: a start-up fetch does not count against the cooldown
    assert source.may_refresh_for("kx")
    refresh(source, kid="kx")  # fetches; kx still unknown: remembered until 1030
    assert server.hits["/jwks"] == 2
    clock.now = 1029  # within the cooldown of that kid-triggered fetch
    assert not source.may_refresh_for("ky")
    assert not source.may_refresh_for("kx")  # in the negative cache
    refresh(source, kid="kx")
    assert server.hits["/jwks"] == 2
    clock.now = 1030
    assert source.may_refresh_for("ky")
    refresh(source, kid="ky")  # remembered until 1060; the next kid fetch from 1060
    assert server.hits["/jwks"] == 3
    clock.now = 1059
    assert not source.may_refresh_for("kz")
    assert not source.may_refresh_for("ky")
    clock.now = 1060  # ky's negative entry expired, and the cooldown is over
    assert source.may_refresh_for("kx")
    assert source.may_refresh_for("ky")
    # a kid that is known needs no fetch at all
    refresh(source, kid="k1")
    assert server.hits["/jwks"] == 3


@pytest.mark.parametrize("cooldown", [1, 5, 30, 120])
def test_a_kid_looked_for_in_vain_is_remembered_for_one_cooldown(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock, cooldown: float
) -> None:
    """Hardening 2, item 2: the negative memory is the cooldown, not a fixed
    minute, so a key the provider publishes late is picked up one cooldown
    after the kid-triggered fetch that missed it."""
    server.serve("/jwks", JWKS1, cache_control="max-age=86400")
    source = make(f"{server.url}/jwks", cooldown=cooldown, max_ttl=86400)
    refresh(source)  # at 1000
    refresh(source, kid="k2")  # the provider has not published k2 yet
    assert kids(source) == ["k1"] and server.hits["/jwks"] == 2
    server.serve("/jwks", jwks((KEY1, "k1"), (KEY2, "k2")), cache_control="max-age=86400")
    clock.now = 1000 + cooldown - 0.5
    assert not source.may_refresh_for("k2")
    refresh(source, kid="k2")
    assert kids(source) == ["k1"] and server.hits["/jwks"] == 2
    clock.now = 1000 + cooldown
    assert source.may_refresh_for("k2")
    refresh(source, kid="k2")
    assert kids(source) == ["k1", "k2"] and server.hits["/jwks"] == 3
    assert verify((issuer_for(source),), token(KEY2, "k2"), NOW).subject == "alice"


def test_a_reload_takes_the_new_cooldown_for_the_negative_memory(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    server.serve("/jwks", JWKS1, cache_control="max-age=3600")
    source = make(f"{server.url}/jwks", cooldown=60)
    refresh(source)
    source.adopt_settings(make(f"{server.url}/jwks", cooldown=2))
    refresh(source, kid="k2")
    clock.now = 1002
    assert source.may_refresh_for("k2")


def test_a_refresh_keeps_the_objects_of_keys_it_serves_again(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    """So that cached tokens verified by an unchanged key stay cached."""
    server.serve("/jwks", JWKS1, cache_control="max-age=300")
    source = make(f"{server.url}/jwks")
    refresh(source)
    k1 = source.keys[0]
    server.serve("/jwks", jwks((KEY1, "k1"), (KEY2, "k2")), cache_control="max-age=300")
    clock.now = 1300
    refresh(source)
    assert kids(source) == ["k1", "k2"] and source.keys[0] is k1
    server.serve("/jwks", jwks((KEY2, "k1")), cache_control="max-age=300")  # kid reused
    clock.now = 1600
    refresh(source)
    assert kids(source) == ["k1"] and source.keys[0] is not k1


def test_an_unknown_kid_right_after_start_up_is_fetched(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    # The provider publishes a key in the first seconds after the gateway's
    # start-up fetch: the first token signed with it triggers a fetch at once.
    server.serve("/jwks", JWKS1, cache_control="max-age=3600")
    source = make(f"{server.url}/jwks")
    refresh(source)  # at 1000
    server.serve("/jwks", jwks((KEY1, "k1"), (KEY2, "k2")), cache_control="max-age=3600")
    clock.now = 1001
    refresh(source, kid="k2")
    assert kids(source) == ["k1", "k2"]
    assert server.hits["/jwks"] == 2


def test_unknown_kid_found_after_rotation(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    server.serve("/jwks", JWKS1, cache_control="max-age=3600")
    source = make(f"{server.url}/jwks")
    refresh(source)
    server.serve("/jwks", jwks((KEY1, "k1"), (KEY2, "k2")), cache_control="max-age=3600")
    clock.now = 1040
    assert source.may_refresh_for("k2")
    refresh(source, kid="k2")
    assert kids(source) == ["k1", "k2"]
    assert source.expires_at == 1040 + 3600
    assert verify((issuer_for(source),), token(KEY2, "k2"), NOW).subject == "alice"


def test_hammering_random_kids_fetches_once_per_cooldown(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    server.serve("/jwks", JWKS1, cache_control="max-age=3600")
    fetched_at: list[float] = []

    def get(url: str, timeout: float) -> tuple[bytes, str | None]:
        fetched_at.append(clock.now)
        return http_get(url, timeout)

    source = make(f"{server.url}/jwks", get=get)
    refresh(source)  # at 1000
    f = fetcher(source)
    rng = random.Random(7)

    async def hammer() -> int:
        calls = 0
        for _ in range(200):  # one request a second, each with a fresh random kid
            clock.now += 1
            await f.refresh(source, "unknown kid", f"{rng.getrandbits(64):016x}")
            calls += 1
        return calls

    assert asyncio.run(hammer()) == 200
    # The start-up fetch at 1000 does not count; the first kid fetches at 1001,
    # and then one every 30 s of cooldown: 1031, 1061, ... 1181.
    assert fetched_at == [1000, 1001, 1031, 1061, 1091, 1121, 1151, 1181]
    assert server.hits["/jwks"] == 8
    kid_fetches = fetched_at[1:]
    assert all(b - a >= 30 for a, b in zip(kid_fetches, kid_fetches[1:], strict=False))
    assert kids(source) == ["k1"]


def test_a_burst_of_unknown_kids_fetches_once(
    server: KeyServer, make: Callable[..., RemoteKeys], clock: Clock
) -> None:
    server.serve("/jwks", JWKS1, cache_control="max-age=3600")
    source = make(f"{server.url}/jwks")
    refresh(source)
    clock.now = 1030
    f = fetcher(source)
    rng = random.Random(11)

    async def burst() -> None:
        await asyncio.gather(
            *(f.refresh(source, "unknown kid", f"{rng.getrandbits(64):016x}") for _ in range(200))
        )

    asyncio.run(burst())
    assert server.hits["/jwks"] == 2
    assert source.fetches == 2


# --- discovery --------------------------------------------------------------------------


def test_discovery(server: KeyServer, make: Callable[..., RemoteKeys]) -> None:
    server.serve(
        "/.well-known/openid-configuration",
        {"issuer": server.url, "jwks_uri": f"{server.url}/jwks"},
    )
    server.serve("/jwks", JWKS1, cache_control="max-age=900")
    source = make(None, issuer=server.url, discovery=True)
    refresh(source)
    assert (kids(source), source.last_error) == (["k1"], None)
    assert server.hits == Counter({"/.well-known/openid-configuration": 1, "/jwks": 1})
    assert source.fetches == 2
    assert source.expires_at - source.clock() == 900  # the JWKS's max-age, not the document's


def test_discovery_issuer_with_trailing_slash(
    server: KeyServer, make: Callable[..., RemoteKeys]
) -> None:
    server.serve(
        "/.well-known/openid-configuration",
        {"issuer": f"{server.url}/", "jwks_uri": f"{server.url}/jwks"},
    )
    server.serve("/jwks", JWKS1)
    source = make(None, issuer=f"{server.url}/", discovery=True)
    refresh(source)
    assert kids(source) == ["k1"]
    assert server.hits["/.well-known/openid-configuration"] == 1


@pytest.mark.parametrize(
    ("document", "error"),
    [
        P({"issuer": "{url}"}, "no usable jwks_uri ('jwks_uri')", id="missing-jwks-uri"),
        P({"issuer": "{url}", "jwks_uri": 42}, "no usable jwks_uri", id="jwks-uri-not-a-string"),
        P(b"<html>", "no usable jwks_uri (Expecting value", id="not-json"),
        P(["{url}/jwks"], "no usable jwks_uri", id="json-list"),
        P(
            {"issuer": "{url}", "jwks_uri": "http://keys.example/jwks"},
            "'http://keys.example/jwks' is plain http to a non-loopback host",
            id="plain-http-non-loopback",
        ),
        P(
            {"issuer": "{url}", "jwks_uri": "ftp://127.0.0.1/jwks"},
            "is not an http(s) URL",
            id="ftp",
        ),
        P(
            {"issuer": "{url}", "jwks_uri": "http://user:pw@127.0.0.1/jwks"},
            "must not carry credentials",
            id="credentials-in-url",
        ),
        P({"issuer": "{url}", "jwks_uri": "/jwks"}, "is not an http(s) URL", id="relative"),
    ],
)
def test_discovery_refuses(
    server: KeyServer,
    make: Callable[..., RemoteKeys],
    document: Any,
    error: str,
) -> None:
    if not isinstance(document, bytes):
        document = json.loads(json.dumps(document).replace("{url}", server.url))
    server.serve("/.well-known/openid-configuration", document)
    server.serve("/jwks", JWKS1)
    source = make(None, issuer=server.url, discovery=True)
    refresh(source)
    assert source.loaded is False
    assert source.last_error is not None
    assert source.last_error.startswith(f"{server.url}/.well-known/openid-configuration: ")
    assert error in source.last_error
    assert server.hits["/jwks"] == 0
    assert source.fetches == 1


def test_discovery_document_not_found(server: KeyServer, make: Callable[..., RemoteKeys]) -> None:
    source = make(None, issuer=server.url, discovery=True)
    refresh(source)
    assert source.last_error is not None and "HTTP Error 404" in source.last_error
    assert source.fetches == 1


@pytest.mark.parametrize(
    ("jwks_uri", "allow_http"),
    [
        P("https://keys.example/jwks", False, id="https-any-host"),
        P("http://keys.example/jwks", True, id="plain-http-allowed"),
    ],
)
def test_discovery_follows_an_acceptable_jwks_uri(
    server: KeyServer, make: Callable[..., RemoteKeys], jwks_uri: str, allow_http: bool
) -> None:
    # https to any host is fine (and plain http when the policy allows it): the
    # address is fetched. The fetch itself is faked; this test has no network.
    server.serve("/.well-known/openid-configuration", {"issuer": server.url, "jwks_uri": jwks_uri})
    asked: list[str] = []

    def get(url: str, timeout: float) -> tuple[bytes, str | None]:
        asked.append(url)
        if url.startswith(server.url):
            return http_get(url, timeout)
        raise FetchError(f"GET {url}: offline")

    source = make(None, issuer=server.url, discovery=True, allow_http=allow_http, get=get)
    refresh(source)
    assert asked == [f"{server.url}/.well-known/openid-configuration", jwks_uri]
    assert source.last_error == f"GET {jwks_uri}: offline"


def test_discovery_document_for_another_issuer_is_refused(
    server: KeyServer, make: Callable[..., RemoteKeys]
) -> None:
    # OpenID Connect Discovery 1.0 §4.3: "The issuer value returned MUST be
    # identical to the Issuer URL that was used as the prefix to
    # /.well-known/openid-configuration"; RFC 8414 §3.3 says the same.
    server.serve(
        "/.well-known/openid-configuration",
        {"issuer": "https://someone-else.test", "jwks_uri": f"{server.url}/jwks"},
    )
    server.serve("/jwks", JWKS1)
    source = make(None, issuer=server.url, discovery=True)
    refresh(source)
    assert source.loaded is False, "keys loaded from a document naming another issuer"
    assert server.hits["/jwks"] == 0


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allow_http", "error"),
    [
        P("https://keys.example/jwks", False, None, id="https"),
        P("HTTPS://keys.example/jwks", False, None, id="https-upper-case"),
        P("https://keys.example:8443/jwks", False, None, id="https-port"),
        P("http://127.0.0.1:8080/jwks", False, None, id="http-ipv4-loopback"),
        P("http://127.9.8.7/jwks", False, None, id="http-loopback-net"),
        P("http://[::1]:8080/jwks", False, None, id="http-ipv6-loopback"),
        P("http://localhost/jwks", False, None, id="http-localhost"),
        P("http://LOCALHOST/jwks", False, None, id="http-localhost-upper-case"),
        P("http://keys.example/jwks", True, None, id="http-allowed"),
        P(
            "http://keys.example/jwks",
            False,
            "'http://keys.example/jwks' is plain http to a non-loopback host "
            "(set allow_http: true)",
            id="http-non-loopback",
        ),
        P("http://10.0.0.1/jwks", False, "plain http to a non-loopback host", id="http-private"),
        P(
            "http://localhost.evil.example/jwks",
            False,
            "plain http to a non-loopback host",
            id="http-localhost-prefix",
        ),
        P(
            "http://127.0.0.1.nip.io/jwks",
            False,
            "plain http to a non-loopback host",
            id="http-loopback-lookalike",
        ),
        P(
            "ftp://keys.example/jwks",
            False,
            "'ftp://keys.example/jwks' is not an http(s) URL",
            id="ftp",
        ),
        P("ftp://keys.example/jwks", True, "is not an http(s) URL", id="ftp-allow-http"),
        P("file:///etc/jwks.json", False, "is not an http(s) URL", id="file"),
        P("https:///jwks", False, "is not an http(s) URL", id="no-host"),
        P("keys.example/jwks", False, "is not an http(s) URL", id="no-scheme"),
        P(
            "https://user:pw@keys.example/jwks",
            False,
            "'https://user:pw@keys.example/jwks' must not carry credentials",
            id="credentials",
        ),
        P("https://user@keys.example/jwks", False, "must not carry credentials", id="user-only"),
        P(
            "http://u:p@127.0.0.1/jwks",
            True,
            "must not carry credentials",
            id="credentials-loopback",
        ),
    ],
)
def test_check_url(url: str, allow_http: bool, error: str | None) -> None:
    if error is None:
        check_url(url, allow_http)
    else:
        with pytest.raises(ValueError) as caught:
            check_url(url, allow_http)
        assert error in str(caught.value)


@pytest.mark.parametrize(
    ("size", "ok"),
    [
        P(MAX_BODY, True, id="exactly-1-MiB"),
        P(MAX_BODY + 1, False, id="one-byte-over"),
        P(3 * MAX_BODY, False, id="3-MiB"),
    ],
)
def test_http_get_body_limit(server: KeyServer, size: int, ok: bool) -> None:
    server.serve("/big", b"x" * size, cache_control="max-age=5")
    url = f"{server.url}/big"
    if ok:
        body, cache_control = http_get(url, 5)
        assert (len(body), cache_control) == (size, "max-age=5")
    else:
        with pytest.raises(FetchError) as caught:
            http_get(url, 5)
        assert str(caught.value) == f"GET {url}: larger than 1048576 bytes"


def _non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
            address: str = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_redirect_to_plain_http_non_loopback_is_refused(
    server: KeyServer, make: Callable[..., RemoteKeys]
) -> None:
    # check_url allows plain http only to loopback: a redirect from an allowed
    # address must not lead the fetch to a host check_url would refuse.
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback address to redirect to")
    elsewhere = KeyServer(address)
    try:
        elsewhere.serve("/jwks", JWKS1)
        target = f"{elsewhere.url}/jwks"
        with pytest.raises(ValueError):
            check_url(target, False)
        server.serve("/jwks", b"", status=302, headers={"Location": target})
        source = make(f"{server.url}/jwks")
        refresh(source)
        assert server.hits["/jwks"] == 1
        assert elsewhere.hits["/jwks"] == 0, f"followed a redirect to {target}"
        assert source.loaded is False
    finally:
        elsewhere.stop()
