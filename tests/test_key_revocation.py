"""Key sets that change under a running gateway, end to end: a real gateway, a
real JWKS server on 127.0.0.1 (or a real `jwks_file`), a recording backend.

- A key the provider removed stops working at once for every token it signed,
  including tokens the gateway verified (and cached) before.
- A key id looked for in vain is looked for again one cooldown later, not a
  fixed minute later: a newly published key is picked up within a cooldown.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from authgate.tools.keys import mint, new_rsa_key
from conftest import Backend, Reply, RunningGateway, send
from test_jwks import KeyServer, jwks

Start = Callable[..., RunningGateway]

AUD = "api"
K1, K2, K3 = new_rsa_key(), new_rsa_key(), new_rsa_key()


@pytest.fixture
def idp() -> Iterator[KeyServer]:
    s = KeyServer()
    yield s
    s.stop()


def issuer_of(idp: KeyServer) -> str:
    return f"{idp.url}/realm"


def publish(idp: KeyServer, *pairs: tuple[Any, str]) -> None:
    # An hour's max-age: no scheduled refresh happens during a test, so only
    # tokens with unknown kids make the gateway fetch.
    idp.serve("/jwks", jwks(*pairs), cache_control="max-age=3600")


def url_policy(tmp_path: Path, idp: KeyServer, cooldown: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\n"
        "authn:\n"
        "  jwt:\n"
        f"    - {{name: idp, issuer: {issuer_of(idp)}, audience: {AUD}, algorithms: [RS256],\n"
        f"       jwks_url: {idp.url}/jwks, jwks_refresh_cooldown: {cooldown}}}\n"
        "rules:\n"
        '  - {name: api, match: {path: "/api/**"}, allow: authenticated}\n'
    )
    return path


def file_policy(tmp_path: Path, keys_file: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\n"
        "authn:\n"
        "  jwt:\n"
        f"    - {{name: static, issuer: https://as.test, audience: {AUD}, algorithms: [RS256],\n"
        f"       jwks_file: {keys_file}}}\n"
        "rules:\n"
        '  - {name: api, match: {path: "/api/**"}, allow: authenticated}\n'
    )
    return path


def get(gw: RunningGateway, token: str) -> Reply:
    return send(gw.address, "GET", "/api/x", [("Authorization", f"Bearer {token}")])


def wait_for(check: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def keys_loaded(gw: RunningGateway, count: int) -> bool:
    status = json.loads(gw.call("authgate.status"))
    return [v["keys"] for v in status["jwks"].values()] == [count]


def assert_refused(gw: RunningGateway, backend: Backend, token: str) -> None:
    before = len(backend.seen)
    r = get(gw, token)
    assert r.status == 401
    assert 'error="invalid_token"' in (r.header("WWW-Authenticate") or "")
    assert len(backend.seen) == before  # the backend saw nothing of it


def test_a_key_the_provider_removed_stops_working_for_tokens_seen_before(
    start_gateway: Start, backend: Backend, idp: KeyServer, tmp_path: Path
) -> None:
    issuer = issuer_of(idp)
    publish(idp, (K1, "k1"))
    gw = start_gateway(url_policy(tmp_path, idp, "1s"))
    wait_for(lambda: keys_loaded(gw, 1))
    seen_before = mint(K1, sub="alice", iss=issuer, aud=AUD, kid="k1")
    assert get(gw, seen_before).status == 200
    assert len(backend.seen) == 1

    # The provider rotates k1 out; a token signed with the new key makes the
    # gateway fetch the new set (polled: the first try may race the fetch).
    publish(idp, (K3, "k3"), (K2, "k2"))
    fresh = mint(K3, sub="bob", iss=issuer, aud=AUD, kid="k3")
    wait_for(lambda: get(gw, fresh).status == 200)
    assert keys_loaded(gw, 2)
    assert gw.addon.policy is not None
    remote = gw.addon.policy.issuers[0].remote
    assert remote is not None and remote.lookup("k1") is None

    backend.clear()
    assert_refused(gw, backend, seen_before)
    assert_refused(gw, backend, mint(K1, sub="carol", iss=issuer, aud=AUD, kid="k1"))
    assert get(gw, mint(K2, sub="dave", iss=issuer, aud=AUD, kid="k2")).status == 200
    assert [s.header("X-Auth-Subject") for s in backend.seen] == ["dave"]


def test_a_key_that_leaves_the_jwks_file_stops_working_on_reload(
    start_gateway: Start, backend: Backend, tmp_path: Path
) -> None:
    keys_file = tmp_path / "jwks.json"
    keys_file.write_text(json.dumps(jwks((K1, "k1"), (K2, "k2"))))
    gw = start_gateway(file_policy(tmp_path, keys_file), "authgate_watch=false")
    seen_before = mint(K1, sub="alice", iss="https://as.test", aud=AUD, kid="k1")
    assert get(gw, seen_before).status == 200
    assert len(backend.seen) == 1

    keys_file.write_text(json.dumps(jwks((K2, "k2"))))
    assert "reload started" in gw.call("authgate.reload")
    wait_for(lambda: gw.addon.reloads == 1)

    backend.clear()
    assert_refused(gw, backend, seen_before)
    assert get(gw, mint(K2, sub="bob", iss="https://as.test", aud=AUD, kid="k2")).status == 200
    assert len(backend.seen) == 1


def test_a_newly_published_key_is_picked_up_within_a_cooldown(
    start_gateway: Start, backend: Backend, idp: KeyServer, tmp_path: Path
) -> None:
    issuer = issuer_of(idp)
    publish(idp, (K1, "k1"))
    gw = start_gateway(url_policy(tmp_path, idp, "1s"))
    wait_for(lambda: keys_loaded(gw, 1))

    # Signed with a key the provider has not published yet: refused, and the
    # gateway's fetch for it finds nothing.
    early = mint(K2, sub="alice", iss=issuer, aud=AUD, kid="k2")
    assert_refused(gw, backend, early)
    fetched = idp.hits["/jwks"]

    publish(idp, (K1, "k1"), (K2, "k2"))
    published = time.monotonic()
    # One cooldown (1 s) later the next token with that kid fetches again;
    # before the fix the kid stayed refused for a minute.
    wait_for(lambda: get(gw, early).status == 200, seconds=25)
    assert time.monotonic() - published < 25
    assert idp.hits["/jwks"] > fetched
    assert [s.header("X-Auth-Subject") for s in backend.seen] == ["alice"]
