"""Every policy under policies/ loads, and does what its comment says."""

from __future__ import annotations

import time
from typing import Any

import pytest

from authgate.core.decision import RequestView, judge
from authgate.core.model import Policy
from authgate.core.ratelimit import Limiter
from authgate.policy.load import load_policy
from authgate.runtime.stores import MemoryStore
from authgate.tools.keys import mint
from conftest import POLICIES

NOW = time.time()


def load(name: str) -> Policy:
    return load_policy(POLICIES / name)


def ask(policy: Policy, path: str, *, method: str = "GET", peer: str = "127.0.0.1",
        token: str | None = None, headers: tuple[tuple[str, str], ...] = (),
        limiter: Limiter | None = None) -> tuple[int, str]:  # fmt: skip
    h = headers + ((("authorization", f"Bearer {token}"),) if token else ())
    d = judge(policy, RequestView(method, path, h, peer), NOW,
               MemoryStore() if limiter is None else limiter)  # fmt: skip
    return d.status, d.reason


POLICY_FILES = sorted(p.name for p in POLICIES.glob("*.yaml") if not p.name.endswith(".tests.yaml"))


@pytest.mark.parametrize("path", POLICY_FILES)
def test_every_policy_loads(path: str, demo_key: Any) -> None:
    policy = load(path)
    assert policy.rules


def test_ip_lists(demo_key: Any) -> None:
    p = load("ip-lists.yaml")
    assert ask(p, "/x", peer="10.20.1.1") == (0, "allowed")
    assert ask(p, "/x", peer="10.20.66.5") == (403, "ip_blocked")
    assert ask(p, "/x", peer="198.51.200.1") == (403, "ip_not_allowed")  # not on the allow list
    assert ask(p, "/x", peer="127.0.0.2") == (403, "ip_blocked")  # from blocklist.txt
    assert ask(p, "/x", peer="::1") == (0, "allowed")


def test_behind_a_proxy(demo_key: Any) -> None:
    p = load("behind-a-proxy.yaml")
    xff = (("x-forwarded-for", "203.0.113.5, 10.0.0.7"),)
    assert ask(p, "/x", peer="10.1.2.3", headers=xff) == (403, "ip_blocked")
    # The same header from a client that is not a proxy is not believed.
    assert ask(p, "/x", peer="198.51.100.1", headers=xff) == (0, "allowed")
    # Counting per real client: one client exhausting its quota leaves another alone.
    limiter = MemoryStore()
    a = (("x-forwarded-for", "198.51.100.10"),)
    b = (("x-forwarded-for", "198.51.100.11"),)
    statuses = [ask(p, "/x", peer="10.0.0.1", headers=a, limiter=limiter)[0] for _ in range(101)]
    assert statuses[-1] == 429 and statuses[:100] == [0] * 100
    assert ask(p, "/x", peer="10.0.0.1", headers=b, limiter=limiter) == (0, "allowed")


def test_rate_limits(demo_key: Any) -> None:
    p = load("rate-limits.yaml")
    limiter = MemoryStore()
    logins = [ask(p, "/login", method="POST", limiter=limiter)[0] for _ in range(6)]
    assert logins == [0, 0, 0, 0, 0, 429]
    t = mint(demo_key, sub="s")
    searches = [ask(p, "/api/search", token=t, limiter=limiter)[0] for _ in range(31)]
    assert searches == [0] * 30 + [429]
    assert ask(p, "/api/search", token=mint(demo_key, sub="other"), limiter=limiter)[0] == 0


def test_hidden_routes(demo_key: Any) -> None:
    p = load("hidden-routes.yaml")
    assert ask(p, "/internal/metrics") == (404, "hidden")
    assert ask(p, "/internal/metrics", token=mint(demo_key, sub="u")) == (404, "hidden")
    assert ask(p, "/nowhere") == (404, "no_rule")
    assert ask(p, "/internal/metrics", token=mint(demo_key, sub="o", roles=["ops"]))[0] == 0


def test_keycloak_claims(demo_key: Any) -> None:
    p = load("keycloak.yaml")

    def kc(**claims: Any) -> str:
        roles = claims.pop("roles", [])
        extra = {"realm_access": {"roles": roles}, **claims}
        return mint(demo_key, sub="u", aud=["account"], extra=extra)

    assert ask(p, "/tenants/acme/x", token=kc(tenant_id="acme"))[0] == 0
    assert ask(p, "/tenants/acme/x", token=kc(tenant_id="other")) == (403, "forbidden")
    assert ask(p, "/tenants/acme/x", token=kc(tenant_id="other", roles=["support"]))[0] == 0
    ok = kc(roles=["billing"], email_verified=True)
    assert ask(p, "/billing/invoices", token=ok)[0] == 0
    assert ask(p, "/billing/invoices", token=kc(roles=["billing"], email_verified="true"))[0] == 403
    suspended = kc(roles=["billing"], email_verified=True, account_status="suspended")
    assert ask(p, "/billing/invoices", token=suspended) == (403, "forbidden")
