"""Who the caller is, once credentials have been verified."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    issuer: str  # the policy's name for the credential source (the issuer URL for JWTs)
    method: str  # the credential kind: "jwt", "api_key", "basic", "mtls"
    roles: frozenset[str]
    scopes: frozenset[str]
    claims: dict[str, Any]
    # Fields the credential sends the backend besides the identity headers
    # (a client certificate: RFC 9440 Client-Cert, when the policy asks).
    forward: tuple[tuple[str, str], ...] = ()
    # The fields the backend gets for this identity, made once (an identity
    # lives as long as its cached token or its API key, not one request).
    headers: tuple[tuple[str, str], ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        headers = (
            ("X-Auth-Subject", self.subject),
            ("X-Auth-Roles", ",".join(sorted(self.roles))),
            ("X-Auth-Scopes", ",".join(sorted(self.scopes))),
            ("X-Auth-Issuer", self.issuer),
            *self.forward,
        )
        object.__setattr__(self, "headers", headers)

    def with_scopes(self, scopes: frozenset[str]) -> Identity:
        return dataclasses.replace(self, scopes=scopes)
