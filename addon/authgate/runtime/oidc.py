"""The OpenID Connect login's calls to the provider: the code exchange, the
refresh and the userinfo request, over HTTP(S) in a worker thread (the
standard library's client, as the key fetches use: no redirects followed,
bounded in size and time). What to send and what the answers mean is
`authgate.core.oidc`'s; this module only carries them.

- the provider's metadata and keys come from the key-set machinery
  (`runtime.jwks.Fetcher`): fetched when missing, joined, never twice at once;
- a refresh is made once for a session, however many of the browser's
  requests carry its cookie at the same moment (a refresh token may be
  good for one use only);
- the provider unreachable, or answering 5xx: the login or the refresh is
  "unavailable" (503 with Retry-After), never a failed login.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from authgate.core import oidc
from authgate.core.oidc import CodeExchange, HttpRequest, SessionRefresh
from authgate.core.tokens import unverified_kid
from authgate.runtime import jwks
from authgate.runtime.jwks import MAX_BODY, Fetcher, FetchError

logger = logging.getLogger("authgate")

Send = Callable[[HttpRequest, float], tuple[int, bytes]]


def http_send(request: HttpRequest, timeout: float) -> tuple[int, bytes]:
    """Send -> (status, body), within `timeout` seconds in all. Blocking: call
    it in a thread. Raises FetchError when there is no answer at all."""
    return jwks.http_send(
        request.method, request.url, request.body, dict(request.headers), timeout, MAX_BODY
    )


class LoginClient:
    """Makes the login's requests to the provider for one gateway."""

    def __init__(self, fetcher: Fetcher, send: Send = http_send) -> None:
        self.fetcher = fetcher
        self.send = send
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self.requests = 0  # made to the provider (for tests and status)

    async def _call(self, request: HttpRequest, timeout: float) -> tuple[int, bytes]:
        self.requests += 1
        return await asyncio.to_thread(self.send, request, timeout)

    async def _metadata(self, login: oidc.Login) -> oidc.ProviderMetadata | None:
        """The provider's metadata, fetched (with its keys) if not yet had."""
        remote = login.issuer.remote
        if remote is not None and login.metadata is None:
            await self.fetcher.join(remote, "cold start")
        return login.metadata

    async def _keys_for(self, login: oidc.Login, id_token: str | None) -> None:
        """The key an ID token names, fetched if the key set lacks it (a
        rotation at the provider), within the fetcher's cooldown."""
        remote = login.issuer.remote
        if id_token is None or remote is None:
            return
        _, kid = unverified_kid(id_token)
        if kid is not None and remote.lookup(kid) is None and remote.may_refresh_for(kid):
            await self.fetcher.join(remote, "unknown kid", kid)

    async def _userinfo(
        self, login: oidc.Login, meta: oidc.ProviderMetadata, access_token: str
    ) -> dict[str, object] | str:
        request = oidc.userinfo_request(meta, access_token)
        if request is None:
            return "the provider has no userinfo endpoint"
        try:
            status, body = await self._call(request, login.timeout)
        except FetchError as e:
            return str(e)
        return oidc.userinfo_response(status, body)

    async def exchange(self, work: CodeExchange) -> None:
        """The code for tokens (then the ID token's key, and userinfo when
        configured): the results go into `work`."""
        login = work.login
        meta = await self._metadata(login)
        if meta is None:
            work.unavailable, work.problem = True, "the provider's metadata cannot be had"
            return
        request = oidc.code_request(work, meta)
        if isinstance(request, str):
            work.problem = request
            return
        try:
            status, body = await self._call(request, login.timeout)
        except FetchError as e:
            work.unavailable, work.problem = True, str(e)
            return
        answer = oidc.token_response(status, body)
        if isinstance(answer, tuple):
            refused, work.problem = answer
            work.unavailable = not refused
            return
        work.tokens = answer
        await self._keys_for(login, answer.id_token)
        if login.userinfo:
            info = await self._userinfo(login, meta, answer.access_token)
            if isinstance(info, dict):
                work.userinfo = info
            else:
                work.problem = info

    async def refresh(self, work: SessionRefresh, clock: Callable[[], float]) -> None:
        """Refresh a session's tokens, once however many requests ask at the
        same moment; the result is recorded for the old cookie (core.oidc)."""
        running = self._refreshing.get(work.key)
        if running is None:
            running = asyncio.get_running_loop().create_task(self._refresh(work, clock))
            self._refreshing[work.key] = running
            running.add_done_callback(lambda _: self._refreshing.pop(work.key, None))
        await asyncio.shield(running)

    async def _refresh(self, work: SessionRefresh, clock: Callable[[], float]) -> None:
        login = work.login
        refresh_token = work.session.refresh_token
        assert refresh_token is not None
        meta = await self._metadata(login)
        answer: oidc.TokenResponse | tuple[bool, str]
        info: dict[str, object] | str | None = None
        if meta is None:
            answer = (False, "the provider's metadata cannot be had")
        else:
            try:
                status, body = await self._call(
                    oidc.refresh_request(login, meta, refresh_token), login.timeout
                )
                answer = oidc.token_response(status, body)
            except FetchError as e:
                answer = (False, str(e))
            if not isinstance(answer, tuple):
                await self._keys_for(login, answer.id_token)
                if login.userinfo:
                    info = await self._userinfo(login, meta, answer.access_token)
        entry = oidc.refreshed(work, answer, info, clock())
        if entry.ended and not entry.unavailable:
            logger.info(f"authgate: a session of {work.session.sub!r} ended: {entry.ended}")
        elif entry.unavailable:
            logger.warning(f"authgate: cannot refresh a session at the provider: {entry.ended}")
