"""Canonical request paths and path patterns.

The gateway judges the path the backend will receive and forwards exactly
that path. `canonicalize()` turns a raw request target into that path, or
raises `AmbiguousPath` for anything some backend might read differently.
`PathPattern` matches canonical segments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from authgate.core.records import record

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
HEX = frozenset("0123456789abcdefABCDEF")
# Octets that must never appear percent-encoded: "/", "\" and NUL.
FORBIDDEN_ENCODED = frozenset({"2F", "5C", "00"})
# Characters allowed raw in a path, besides "%" (RFC 3986 pchar and "/").
RAW_ALLOWED = frozenset(UNRESERVED | set("!$&'()*+,=:@/"))


class AmbiguousPath(ValueError):
    """The request target cannot be given one meaning; the answer is 400."""


@record
class CanonicalPath:
    path: str  # what the backend receives, without the query
    query: str  # the query as the client sent it, without "?" ("" if none)
    has_query: bool
    segments: tuple[str, ...]  # decoded segments used for matching

    @property
    def target(self) -> str:
        """The request target to forward: canonical path plus the original query."""
        return f"{self.path}?{self.query}" if self.has_query else self.path


_DOUBLE_ENCODED = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)


def _normalize_segment(raw: str) -> tuple[str, str]:
    """One raw segment -> (normalized encoded form, decoded form).

    Percent-encoded octets decode as UTF-8 (RFC 3986 §2.5); octets that are
    not valid UTF-8 (overlong forms included) make the path ambiguous.
    """
    out: list[str] = []
    octets = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        c = raw[i]
        if c == "%":
            h = raw[i + 1 : i + 3]
            if len(h) != 2 or h[0] not in HEX or h[1] not in HEX:
                raise AmbiguousPath("invalid percent-encoding")
            h = h.upper()
            if h in FORBIDDEN_ENCODED:
                raise AmbiguousPath(f"encoded %{h} in path")
            value = int(h, 16)
            ch = chr(value)
            out.append(ch if ch in UNRESERVED else "%" + h)
            octets.append(value)
            i += 3
            continue
        if c not in RAW_ALLOWED:
            if c == "\\":
                raise AmbiguousPath("backslash in path")
            if c == ";":
                raise AmbiguousPath("';' parameters in path")
            raise AmbiguousPath("character not allowed in a path")
        out.append(c)
        octets.append(ord(c))
        i += 1
    try:
        decoded = octets.decode("utf-8")
    except UnicodeDecodeError:
        # Overlong forms (%c0%af for "/") and other invalid UTF-8: a lenient
        # decoder downstream may read them as "/" or "." (RFC 3629 §10).
        raise AmbiguousPath("percent-encoded octets that are not UTF-8") from None
    # Decoded once, does it still hold an encoded dot, slash, backslash or
    # NUL? Then some backend that decodes twice reads something else.
    if "%" in decoded and _DOUBLE_ENCODED.search(decoded):
        raise AmbiguousPath("double percent-encoding in path")
    return "".join(out), decoded


# A path of plain characters only (no "%", ";" or "\\"): nothing to decode.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_PLAIN_QUERY = re.compile(r"[\x21-\x7e]*")


def canonicalize(target: str) -> CanonicalPath:
    """Canonicalize an origin-form request target (path plus optional query).

    Raises AmbiguousPath for targets that must be answered with 400.
    """
    if not target.startswith("/"):
        raise AmbiguousPath("request target is not an absolute path")
    path, sep, query = target.partition("?")
    if "#" in target:
        raise AmbiguousPath("fragment in request target")
    if not _PLAIN_QUERY.fullmatch(query):
        raise AmbiguousPath("character not allowed in the query")
    trailing_slash = len(path) > 1 and path.endswith("/")
    if _PLAIN_PATH.fullmatch(path):
        plain = path[1:].split("/")
        if "" in plain:  # "//", a trailing slash, the root: empty segments go
            plain = [seg for seg in plain if seg]
        if "." not in plain and ".." not in plain:
            canonical = "/" + "/".join(plain)
            if trailing_slash and plain:
                canonical += "/"
            return CanonicalPath(canonical, query, bool(sep), tuple(plain))
    encoded: list[str] = []
    decoded: list[str] = []
    for raw in path.split("/"):
        if raw == "":
            continue  # "//" collapses: many backends read it as "/"
        enc, dec = _normalize_segment(raw)
        if dec in (".", ".."):
            # remove_dot_segments (RFC 3986 §5.2.4): "/a/b/.." is "/a/"
            trailing_slash = True
            if dec == "..":
                if not encoded:
                    raise AmbiguousPath("dot segment climbs above the root")
                encoded.pop()
                decoded.pop()
            continue
        trailing_slash = len(path) > 1 and path.endswith("/")
        encoded.append(enc)
        decoded.append(dec)
    canonical = "/" + "/".join(encoded)
    if trailing_slash and encoded:
        canonical += "/"
    return CanonicalPath(canonical, query, bool(sep), tuple(decoded))


# --- patterns -------------------------------------------------------------

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A compiled path pattern: literals, `{name}`, `*` and a final `**`."""

    text: str
    parts: tuple[str | None, ...]  # literal segment, or None for a wildcard
    params: tuple[tuple[int, str], ...]  # (segment index, parameter name)
    rest: bool  # ends in "**"

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        if not text.startswith("/"):
            raise ValueError(f"path pattern {text!r} must start with '/'")
        raw_parts = [p for p in text.split("/")[1:]]
        if raw_parts and raw_parts[-1] == "":
            raw_parts.pop()  # "/a/" is the same pattern as "/a"
        parts: list[str | None] = []
        params: list[tuple[int, str]] = []
        rest = False
        for index, seg in enumerate(raw_parts):
            if rest:
                raise ValueError(f"'**' must be the last segment of {text!r}")
            if seg == "**":
                rest = True
                continue
            if seg == "*":
                parts.append(None)
                continue
            m = _PARAM.match(seg)
            if m:
                name = m.group(1)
                if any(name == p for _, p in params):
                    raise ValueError(f"parameter {{{name}}} appears twice in {text!r}")
                params.append((index, name))
                parts.append(None)
                continue
            if seg == "" or "{" in seg or "}" in seg or "*" in seg:
                raise ValueError(f"bad segment {seg!r} in path pattern {text!r}")
            if seg in (".", ".."):
                raise ValueError(f"dot segment in path pattern {text!r}")
            try:
                _, dec = _normalize_segment(seg)
            except AmbiguousPath as e:
                raise ValueError(f"bad segment {seg!r} in path pattern {text!r}: {e}") from e
            if dec in (".", ".."):
                raise ValueError(f"dot segment in path pattern {text!r}")
            parts.append(dec)
        return cls(text, tuple(parts), tuple(params), rest)

    @property
    def param_names(self) -> frozenset[str]:
        return frozenset(name for _, name in self.params)

    def match(self, segments: tuple[str, ...]) -> dict[str, str] | None:
        """Parameters if the canonical segments match, else None."""
        n = len(self.parts)
        if len(segments) < n or (not self.rest and len(segments) != n):
            return None
        for literal, seg in zip(self.parts, segments, strict=False):
            if literal is not None and literal != seg:
                return None
        if not self.params:
            return {}  # (a comprehension would cost a frame for nothing)
        return {name: segments[i] for i, name in self.params}
