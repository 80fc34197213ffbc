"""The mitmproxy adapter: options in, flows to `decide()`, decisions back out.

Everything interesting happens in the pure core; this module only converts a
flow to a `RequestView`, a `Decision` to a response or a rewritten request,
and keeps the gateway failing closed: an exception while judging answers 500
and the request never reaches the backend.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from mitmproxy import command, ctx, exceptions, flow, http

from .decision import FORBIDDEN, Decision, RequestView, decide
from .explain import explain as explain_request
from .ipset import normalize_ip
from .policy import IDENTITY_HEADERS, Policy, PolicyError, load_policy
from .ratelimit import Limiter
from .responses import Rendered, render, render_error

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

    def done(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # --- hooks -------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        try:
            self._judge(flow)
        except Exception:  # noqa: BLE001 - the one place that must catch everything
            logger.exception("authgate: error while judging a request; answering 500")
            self._fail(flow, 500, "internal_error")

    def request(self, flow: http.HTTPFlow) -> None:
        # Fail closed: a request that reaches here unjudged is never forwarded.
        if flow.response is not None or METADATA_KEY in flow.metadata:
            return
        logger.error("authgate: a request reached the request hook unjudged; answering 500")
        self._fail(flow, 500, "unjudged")

    # --- commands ------------------------------------------------------------

    @command.command("authgate.explain")  # type: ignore[untyped-decorator]
    def explain(self, flows: Sequence[flow.Flow]) -> None:
        """Log how authgate decides each flow's request, step by step (as the
        request is now: a forwarded one carries the path and headers the gateway
        gave it). Rate limits are read, not counted. Try `authgate.explain @focus`."""
        policy = self.policy
        if policy is None:
            raise exceptions.CommandError("authgate: no policy loaded")
        for f in flows:
            if isinstance(f, http.HTTPFlow):
                view = request_view(f, policy.uses_host)
                told = explain_request(policy, view, self.clock(), self.limiter)
                logger.info("authgate.explain:\n" + told.text().rstrip("\n"))

    # --- the work ------------------------------------------------------------

    def _fail(self, flow: http.HTTPFlow, status: int, reason: str) -> None:
        """The gateway itself cannot judge: answer 500/503, never forward."""
        retry = 60 if status == 503 else None
        _respond(flow, render_error(status, flow.request.method, retry_after=retry))
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
            _respond(flow, render(decision, policy.realm, req.method))
        self._record(flow, decision)

    def _forward(self, flow: http.HTTPFlow, policy: Policy, d: Decision, peer: str) -> None:
        req = flow.request
        assert d.path is not None
        if req.path != d.path.target:
            req.path = d.path.target
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
