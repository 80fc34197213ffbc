"""Hot reload: notice that the policy or a file it reads changed, and carry
the state worth keeping (fetched keys) from the old policy to the new one.

Building the new policy happens in a thread (a million-entry block list takes
seconds), and the swap is one assignment; rate-limit counters live in the
gateway, keyed by limit name, key and rate, so an unchanged limit keeps its
counts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from authgate.core.model import Policy
from authgate.core.tokens import Issuer

Fingerprint = dict[str, tuple[int, int] | None]


def fingerprint(files: Iterable[str]) -> Fingerprint:
    """(mtime in ns, size) of each file, or None for a missing one."""
    out: Fingerprint = {}
    for name in files:
        try:
            st = os.stat(name)
        except OSError:
            out[name] = None
        else:
            out[name] = (st.st_mtime_ns, st.st_size)
    return out


def carry_over(old: Policy, new: Policy) -> Policy:
    """The new policy, with the old one's fetched key sets where the issuer's
    key source is unchanged (no 503 window, no refetch storm on reload), and
    its introspection answers where the issuer asks and reads them alike (a
    reload while the provider is down keeps serving the tokens it knew).
    Verified tokens are not carried: the new policy's token cache starts
    empty, so a key that left a `jwks_file` verifies nothing after the swap.
    The OpenID Connect login keeps its provider's keys and metadata and what
    it learnt (nonces used, sessions just refreshed) while its provider and
    client stay the same; sessions opened are opened again, with the new keys."""
    previous = {i.issuer: i for i in old.issuers}
    issuers = []
    changed = False
    for issuer in new.issuers:
        before = previous.get(issuer.issuer)
        kept = before.remote if before is not None else None
        if issuer.remote is not None and kept is not None and kept.same_source(issuer.remote):
            kept.adopt_settings(issuer.remote)
            issuer = dataclasses.replace(issuer, remote=kept)
            changed = True
        asked = before.introspection if before is not None else None
        if (
            before is not None
            and asked is not None
            and issuer.introspection is not None
            and asked.same_source(issuer.introspection)
            and _reads_alike(before, issuer)
        ):
            issuer = dataclasses.replace(issuer, introspection=asked)
            changed = True
        issuers.append(issuer)
    login = new.login
    if (
        login is not None
        and old.login is not None
        and (old.login.issuer.issuer, old.login.client_id) == (login.issuer.issuer, login.client_id)
        and login.issuer.remote is not None
        and old.login.issuer.remote is not None
        and old.login.issuer.remote.same_source(login.issuer.remote)
    ):
        kept = old.login.issuer.remote
        kept.adopt_settings(login.issuer.remote)
        login = dataclasses.replace(
            login,
            issuer=dataclasses.replace(login.issuer, remote=kept),
            state=old.login.state,
        )
        return dataclasses.replace(new, issuers=tuple(issuers), login=login)
    return dataclasses.replace(new, issuers=tuple(issuers)) if changed else new


def _reads_alike(a: Issuer, b: Issuer) -> bool:
    """The settings a remembered introspection answer was read with."""
    return (a.audience, a.roles_claim, a.scope_claim, a.required_claims, a.max_token_age) == (
        b.audience,
        b.roles_claim,
        b.scope_claim,
        b.required_claims,
        b.max_token_age,
    )
