"""mitmweb's (and the console's) "authgate" content view: why a request was
decided as it was, laid out for reading, on the gateway's own answers and on
requests that carry a credential.

Three parts: the decision as recorded, the credential decoded (a JWT's header
and claims, its times in words; a Basic user; an API key's name: never a
secret, a password or a signature), and the steps, judged again as of the
request's time with the gateway's policy (rate limits read, not counted).

mitmproxy 12 rewrote the content view API (`Contentview.prettify(data,
metadata)`, `contentviews.registry`); 11 has `View.__call__` and
`contentviews.add/remove`. `describe()` is the same for both; `attach()` and
`detach()` (the Gateway's load and done) pick the API the installed mitmproxy has.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from mitmproxy import contentviews, http
from mitmproxy import flow as mflow

from authgate.core.credentials import API_KEY, BASIC, JWT, MTLS, Ambiguous, JwtVerifier, find
from authgate.core.decision import NO_BANS, Bans, RequestView
from authgate.core.explanation import explain
from authgate.core.model import Policy
from authgate.core.ratelimit import Store
from authgate.core.tokens import TokenRejected, _unverified_part, _when

NAME = "authgate"
# Higher than every view mitmproxy has (JSON, HTML: 1-2), so that a denial's
# body and a request with a credential open on this view.
PRIORITY = 10.0
# The request as the gateway judged it, kept on the flow (not in its metadata,
# which is saved with the flow): a forwarded request loses credentials and
# gains X-Auth-* headers.
JUDGED = "_authgate_judged"
TIME_CLAIMS = ("exp", "nbf", "iat", "auth_time")
# The recorded entry's keys (house/gatehouse.py `record`), as labelled here.
_RECORDED = (
    ("decision", "decision"),
    ("status", "status"),
    ("rule", "rule"),
    ("reason", "reason"),
    ("subject", "subject"),
    ("via", "via"),
    ("client_ip", "client ip"),
    ("request_id", "request id"),
)
_NEW_API = hasattr(contentviews, "Contentview")  # mitmproxy 12 and later


class Source:
    """What the view needs of the gateway that attached it: the policy in
    force, the rate-limit counters to read, and how to read a flow's request
    (for flows the gateway did not judge, e.g. loaded from a file)."""

    def __init__(self) -> None:
        self.owner: object = None
        self.policy: Callable[[], Policy | None] = lambda: None
        self.limiter: Callable[[], Store] | None = None
        self.fallback: Callable[[http.HTTPFlow], RequestView] | None = None
        self.bans: Callable[[], Bans] = lambda: NO_BANS


SOURCE = Source()


def judged_request(
    f: http.HTTPFlow, fallback: Callable[[http.HTTPFlow], RequestView]
) -> RequestView:
    view = getattr(f, JUDGED, None)
    return view if isinstance(view, RequestView) else fallback(f)


def wanted(f: mflow.Flow | None, message: Any, policy: Policy | None) -> bool:
    """A gateway answer, or a request carrying a credential (or a Cookie)."""
    if not isinstance(f, http.HTTPFlow) or message is None:
        return False
    if message is f.response:
        entry = f.metadata.get("authgate")
        return isinstance(entry, dict) and not entry.get("forwarded", True)
    if message is f.request:
        names = ["authorization", "cookie"]
        if policy is not None and policy.api_keys is not None:
            names.append(policy.api_keys.header)
        return any(name in f.request.headers for name in names)
    return False


def describe(
    f: http.HTTPFlow,
    policy: Policy | None,
    limiter: Store | None,
    fallback: Callable[[http.HTTPFlow], RequestView],
    bans: Bans = NO_BANS,
) -> str:
    """The whole view as text."""
    lines: list[str] = []
    entry = f.metadata.get("authgate")
    head = f.comment.split("\n", 1)[0] if f.comment else ""
    lines.append(f"authgate: {head}" if head else "authgate: no decision recorded on this flow")
    if isinstance(entry, dict):
        lines += ["", "decision (as recorded)"]
        lines += _pairs((label, entry.get(key)) for key, label in _RECORDED)
    request = judged_request(f, fallback)
    now = f.request.timestamp_start
    lines += ["", *credential(request, policy, now)]
    if policy is None or limiter is None:
        lines += ["", "steps: no policy loaded"]
    else:
        when = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines += ["", f"steps (judged again as of the request's time, {when}; limits read)"]
        told = explain(policy, request, now, limiter, bans)
        # The explanation starts with the request's headers (shown in mitmweb
        # already, credentials in part): the steps and the outcome only.
        blank = told.lines.index("") if "" in told.lines else 0
        lines += [line for line in told.lines[blank + 1 :]]
    return "\n".join(lines) + "\n"


def _pairs(items: Any) -> list[str]:
    shown = [(str(k), v) for k, v in items if v not in (None, "")]
    width = max((len(k) for k, _ in shown), default=0)
    return [f"  {k.ljust(width)}  {v}" for k, v in shown]


def credential(request: RequestView, policy: Policy | None, now: float) -> list[str]:
    """The credential the request carries, decoded: never the secret part."""
    if policy is None:
        return ["credential: no policy loaded to say which header carries one"]
    target = request.target
    query = target.partition("?")[2]
    try:
        presented, malformed = find(
            policy.issuers,
            policy.api_keys,
            policy.basic,
            request.headers,
            query,
            cookies=policy.cookie_issuers,
            params=policy.query_issuers,
            client_cert=request.client_cert if policy.mtls is not None else None,
        )
    except Ambiguous as e:
        return [f"credential: ambiguous ({e})"]
    if malformed is not None:
        return ["credential: Basic, not user:password once decoded (not shown)"]
    if presented is None:
        return ["credential: none this policy reads"]
    where = f"from the {presented.via}"
    if presented.kind == BASIC:
        user = presented.value.partition(":")[0]
        return [f"credential: Basic {where}", f"  user      {user!r}", "  password  (not shown)"]
    if presented.kind == API_KEY:
        assert policy.api_keys is not None
        who = policy.api_keys.verify(presented.value)
        name = repr(who.subject) if who is not None else "none: not a key of this policy"
        return [f"credential: API key {where}", f"  name  {name}", "  key   (not shown)"]
    if presented.kind == MTLS:
        cert = presented.cert
        assert cert is not None
        verdict = (
            f"did not verify in the TLS handshake: {cert.problem}"
            if cert.problem
            else "verified in the TLS handshake"
        )
        return [
            f"credential: client certificate ({verdict})",
            *_pairs(
                [
                    ("subject", cert.subject),
                    ("dns", ", ".join(cert.san_dns)),
                    ("uri", ", ".join(cert.san_uri)),
                    ("email", ", ".join(cert.san_email)),
                    ("issuer", cert.issuer),
                    ("sha256", cert.sha256),
                ]
            ),
        ]
    assert presented.kind == JWT
    verifier = policy.verifiers.get(JWT)
    asked = verifier.introspected_by(presented) if isinstance(verifier, JwtVerifier) else None
    if asked is not None:
        return [
            f"credential: opaque bearer token {where}",
            f"  issuer  {asked.issuer} (asked by introspection, RFC 7662)",
            "  token   (not shown)",
        ]
    return [f"credential: JWT {where}", *token_lines(presented.value, now)]


def token_lines(token: str, now: float) -> list[str]:
    """A JWT's header and claims, unverified, times in words; no signature."""
    try:
        header = _unverified_part(token, 0)
        claims = _unverified_part(token, 1)
    except (TokenRejected, IndexError) as e:
        return [f"  not a readable JWT ({e})"]
    out = ["  header"]
    out += _pairs_deep(header)
    out.append("  claims (as sent; the steps say whether they verify)")
    out += _pairs_deep(claims, now)
    out.append("  signature  (not shown)")
    return out


def _pairs_deep(values: dict[str, Any], now: float | None = None) -> list[str]:
    width = max((len(k) for k in values), default=0)
    out: list[str] = []
    for k, v in values.items():
        shown = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
        if len(shown) > 200:
            shown = shown[:199] + "…"
        if now is not None and k in TIME_CLAIMS and isinstance(v, int | float):
            if not isinstance(v, bool):
                shown = f"{shown} = {_when(float(v), now)}"
        out.append(f"    {k.ljust(width)}  {shown}")
    return out


# --- the two content view APIs --------------------------------------------------


def _render(f: mflow.Flow | None) -> str:
    if not isinstance(f, http.HTTPFlow):
        raise ValueError("authgate: not an HTTP flow")
    if SOURCE.limiter is None or SOURCE.fallback is None:
        raise ValueError("authgate: the gateway is not loaded")
    return describe(f, SOURCE.policy(), SOURCE.limiter(), SOURCE.fallback, SOURCE.bans())


def _priority(f: mflow.Flow | None, message: Any) -> float:
    return PRIORITY if SOURCE.limiter is not None and wanted(f, message, SOURCE.policy()) else -1


class NewView:
    """mitmproxy 12's Contentview protocol (duck-typed: 11 has no such class)."""

    name = NAME
    syntax_highlight = "none"

    def prettify(self, data: bytes, metadata: Any) -> str:
        return _render(metadata.flow)

    def render_priority(self, data: bytes, metadata: Any) -> float:
        return _priority(metadata.flow, metadata.http_message)

    def __lt__(self, other: Any) -> bool:
        return bool(self.name < other.name)


if not _NEW_API:  # subclassing View warns (deprecated) in 12

    class OldView(contentviews.View):
        """mitmproxy 11's View."""

        name = NAME

        def __call__(
            self,
            data: bytes,
            *,
            content_type: str | None = None,
            flow: mflow.Flow | None = None,
            http_message: http.Message | None = None,
            **unknown_metadata: Any,
        ) -> tuple[str, Iterator[list[tuple[str, str | bytes]]]]:
            text = _render(flow)
            return "authgate", iter([[("text", line)] for line in text.splitlines()])

        def render_priority(
            self,
            data: bytes,
            *,
            content_type: str | None = None,
            flow: mflow.Flow | None = None,
            http_message: http.Message | None = None,
            **unknown_metadata: Any,
        ) -> float:
            return _priority(flow, http_message)


_registered: Any = None


def attach(
    owner: object,
    policy: Callable[[], Policy | None],
    limiter: Callable[[], Store],
    fallback: Callable[[http.HTTPFlow], RequestView],
    bans: Callable[[], Bans] = lambda: NO_BANS,
) -> None:
    """Register the view (once per process) and point it at `owner`'s gateway."""
    global _registered
    SOURCE.owner, SOURCE.policy, SOURCE.limiter, SOURCE.fallback, SOURCE.bans = (
        owner, policy, limiter, fallback, bans,
    )  # fmt: skip
    if _registered is not None:
        return
    view: Any = NewView() if _NEW_API else OldView()  # noqa: F821 (defined on 11)
    if not _NEW_API and (old := contentviews.get(NAME)) is not None:
        contentviews.remove(old)  # left by an earlier import of this module
    contentviews.add(view)
    _registered = view


def detach(owner: object) -> None:
    """Unregister (11), or leave it registered and idle (12 has no removal:
    it offers nothing and says so if chosen)."""
    global _registered
    if SOURCE.owner is not owner:
        return  # another gateway attached since
    SOURCE.owner, SOURCE.policy, SOURCE.limiter, SOURCE.fallback = None, lambda: None, None, None
    SOURCE.bans = lambda: NO_BANS
    if not _NEW_API and _registered is not None:
        contentviews.remove(_registered)
        _registered = None
