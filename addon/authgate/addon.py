"""The mitmproxy adapter: options in, flows to `decide()`, decisions back out.

Everything interesting happens in the pure core; this module only converts a
flow to a `RequestView`, a `Decision` to a response or a rewritten request,
and keeps the gateway failing closed: an exception while judging answers 500
and the request never reaches the backend.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import IO, Any

from mitmproxy import ctx, exceptions, http

from .credentials import BASIC, JWT, Ambiguous, find
from .decision import FORBIDDEN, Decision, RequestView, decide, passes_ip_checks
from .ipset import normalize_ip
from .policy import IDENTITY_HEADERS, Policy, PolicyError, load_policy
from .ratelimit import Limiter
from .responses import Rendered, render, render_error
from .tokens import unverified_kid

logger = logging.getLogger("authgate")
METADATA_KEY = "authgate"


def request_view(flow: http.HTTPFlow, with_host: bool) -> RequestView:
    req = flow.request
    headers = tuple((k.lower(), v) for k, v in req.headers.items(multi=True))
    host = req.host_header if with_host else None
    return RequestView(req.method, req.path, headers, flow.client_conn.peername[0], host)


def _respond(flow: http.HTTPFlow, r: Rendered) -> None:
    flow.response = http.Response.make(
        r.status, r.body, [(k.encode(), v.encode()) for k, v in r.headers]
    )
    # mitmproxy would still send "100 Continue" and read the body we refuse.
    flow.request.headers.pop("expect", None)
    # Setting a response on a streamed request crashes mitmproxy (see
    # mitmproxy-facts §1); this request is answered here, so never stream it.
    flow.request.stream = False


class Gateway:
    """The authgate addon. One instance per mitmproxy master."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.policy: Policy | None = None
        self.limiter = Limiter()
        self.clock = clock
        self._log_file: IO[str] | None = None
        self.decide = decide  # replaced in fail-closed tests only
        self._keys_task: asyncio.Task[None] | None = None
        self._bcrypt_slots = asyncio.Semaphore(2)  # bcrypt is CPU-bound: two at a time

    # --- options -----------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option("authgate_policy", str, "", "The authgate policy file (YAML). Required.")
        loader.add_option(
            "authgate_log",
            str,
            "",
            "Append one JSON line per decision to this file (default: mitmproxy's log).",
        )

    def configure(self, updated: set[str]) -> None:
        if "authgate_policy" in updated or "keep_host_header" in updated:
            path = ctx.options.authgate_policy
            if not path:
                # Not an error yet: options arrive one by one. `running` refuses
                # to serve without a policy, and until then nothing is forwarded.
                self.policy = None
                return
            try:
                policy = load_policy(path)
            except PolicyError as e:
                raise exceptions.OptionsError(f"authgate: {e}") from e
            if policy.uses_host and not ctx.options.keep_host_header:
                raise exceptions.OptionsError(
                    f"authgate: {path} matches rules on host, but in reverse mode mitmproxy "
                    "replaces the client's Host unless keep_host_header=true is set"
                )
            self.policy = policy  # one assignment: the old policy serves until here
            logger.info(
                f"authgate: policy {path} loaded ({len(policy.rules)} rules, "
                f"{policy.block.entries} blocked ranges, {len(policy.issuers)} issuers)"
            )
        if "authgate_log" in updated:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if ctx.options.authgate_log:
                try:
                    self._log_file = open(ctx.options.authgate_log, "a", buffering=1)  # noqa: SIM115
                except OSError as e:
                    raise exceptions.OptionsError(
                        f"authgate: cannot open authgate_log {ctx.options.authgate_log}: "
                        f"{e.strerror}"
                    ) from e

    def running(self) -> None:
        if self.policy is None:
            logger.error(
                "authgate: no policy; pass --set authgate_policy=FILE "
                "(for example policies/example.yaml). Every request is answered 503."
            )
            return
        self._warn_basic_in_clear(self.policy)
        self._keys_task = asyncio.get_running_loop().create_task(self._keep_keys_fresh())

    def done(self) -> None:
        if self._keys_task is not None:
            self._keys_task.cancel()
            self._keys_task = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @staticmethod
    def _warn_basic_in_clear(policy: Policy) -> None:
        if policy.basic is None:
            return
        for mode in ctx.options.mode:
            listen = mode.rpartition("@")[2] if "@" in mode else ""
            host = listen.rpartition(":")[0].strip("[]") if ":" in listen else ""
            if host in ("127.0.0.1", "localhost", "::1"):
                continue
            logger.warning(
                f"authgate: Basic credentials are accepted on {listen or 'all interfaces'}; "
                "unless clients connect with TLS, passwords cross the network in clear text"
            )

    async def _keep_keys_fresh(self) -> None:
        """Fetch remote key sets at start and whenever they expire (or, after
        a failure, when the backoff says). Off the request path."""
        while True:
            policy = self.policy
            sources = [i.remote for i in policy.issuers if i.remote] if policy else []
            for source in sources:
                if source.due():
                    await source.refresh()
            wait = min((s.next_attempt - s.clock() for s in sources), default=60.0)
            await asyncio.sleep(min(max(wait, 0.5), 60.0))

    # --- hooks -------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        try:
            if self.policy is not None:
                await self._prepare(self.policy, request_view(flow, self.policy.uses_host))
            self._judge(flow)
        except Exception:  # noqa: BLE001 - the one place that must catch everything
            logger.exception("authgate: error while judging a request; answering 500")
            self._fail(flow, 500, "internal_error")

    def response(self, flow: http.HTTPFlow) -> None:
        # RFC 6750 §2.3: a response to a request authenticated by a query
        # token must not be stored by shared caches.
        entry = flow.metadata.get(METADATA_KEY)
        if flow.response is not None and isinstance(entry, dict) and entry.get("via") == "query":
            if "cache-control" not in flow.response.headers:
                flow.response.headers["Cache-Control"] = "private"

    async def _prepare(self, policy: Policy, view: RequestView) -> None:
        """The slow or remote parts of checking credentials, done before the
        pure decision so that it finds their results: a bcrypt check (in a
        thread), a JWKS refresh for a key id we do not know yet."""
        try:
            presented, _ = find(
                policy.issuers,
                policy.api_keys,
                policy.basic,
                view.headers,
                view.target.partition("?")[2],
            )
        except Ambiguous:
            return
        if presented is None:
            return
        if presented.kind == BASIC and policy.basic is not None:
            user, _, password = presented.value.partition(":")
            now = time.monotonic()
            if policy.basic.cached(user, password, now) is None and passes_ip_checks(
                policy, view, self.clock(), self.limiter
            ):
                async with self._bcrypt_slots:
                    await asyncio.to_thread(policy.basic.check, user, password, now)
        elif presented.kind == JWT:
            iss, kid = unverified_kid(presented.value)
            for issuer in presented.issuers:
                source = issuer.remote
                if source is None or (len(presented.issuers) > 1 and issuer.issuer != iss):
                    continue
                if not source.loaded and source.due():
                    await source.refresh("cold start")
                elif kid is not None and source.lookup(kid) is None and source.may_refresh_for(kid):
                    await source.refresh("unknown kid", kid=kid)

    def request(self, flow: http.HTTPFlow) -> None:
        # Fail closed: a request that reaches here unjudged is never forwarded.
        if flow.response is not None or METADATA_KEY in flow.metadata:
            return
        logger.error("authgate: a request reached the request hook unjudged; answering 500")
        self._fail(flow, 500, "unjudged")

    # --- the work ------------------------------------------------------------

    def _fail(self, flow: http.HTTPFlow, status: int, reason: str) -> None:
        """The gateway itself cannot judge: answer 500/503, never forward."""
        retry = 60 if status == 503 else None
        accept = flow.request.headers.get("accept")
        _respond(flow, render_error(status, flow.request.method, retry_after=retry, accept=accept))
        flow.metadata[METADATA_KEY] = {"status": status, "reason": reason}
        flow.comment = f"authgate: {status} {reason}"

    def _judge(self, flow: http.HTTPFlow) -> None:
        policy = self.policy
        if policy is None:
            self._fail(flow, 503, "no_policy")
            return
        req = flow.request
        view = request_view(flow, policy.uses_host)
        if req.authority and "@" in req.authority:
            decision = Decision(False, 400, "bad_target", detail="userinfo in the target")
        else:
            decision = self.decide(policy, view, self.clock(), self.limiter)
        if decision.allowed:
            self._forward(flow, policy, decision, view.peer)
        else:
            accept = req.headers.get("accept")
            _respond(flow, render(decision, policy.realm, req.method, accept=accept))
        self._record(flow, decision)

    def _forward(self, flow: http.HTTPFlow, policy: Policy, d: Decision, peer: str) -> None:
        req = flow.request
        if req.path != d.target:
            req.path = d.target
        if req.authority and req.http_version.startswith("HTTP/1"):
            req.authority = ""  # absolute-form: forward as origin-form, judged path only
        headers = req.headers
        for name in IDENTITY_HEADERS:
            if name in headers:
                del headers[name]
        for name, value in d.upstream_headers:
            headers[name] = value
        if not policy.forward_credentials and "authorization" in headers:
            del headers["authorization"]
        chain = headers.get_all("x-forwarded-for")
        chain.append(normalize_ip(peer))
        headers.set_all("X-Forwarded-For", [", ".join(chain)])

    def _record(self, flow: http.HTTPFlow, d: Decision) -> None:
        subject = d.identity.subject if d.identity is not None else None
        entry = {
            "time": round(time.time(), 3),
            "client_ip": d.client_ip,
            "method": flow.request.method,
            "path": d.path.path if d.path is not None else flow.request.path.split("?")[0][:200],
            "rule": d.rule,
            "decision": "allow" if d.allowed else "deny",
            "status": d.status or None,
            "reason": d.reason,
            "subject": subject,
            "via": d.via,
        }
        flow.metadata[METADATA_KEY] = entry
        if d.allowed:
            flow.comment = f"authgate: allowed by rule {d.rule}"
        else:
            flow.comment = f"authgate: {d.status} {d.reason}" + (
                f" (rule {d.rule})" if d.rule else ""
            )
        line = json.dumps(entry, separators=(",", ":"))
        if self._log_file is not None:
            self._log_file.write(line + "\n")
        if d.reason == FORBIDDEN:
            logger.warning(line)  # an authenticated caller was refused: worth a look
        elif self._log_file is None:
            logger.info(line)
