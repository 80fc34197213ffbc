"""canonicalize() and PathPattern."""

from __future__ import annotations

import pytest

from authgate.core.paths import AmbiguousPath, CanonicalPath, PathPattern, canonicalize

P = pytest.param

# --- canonicalize(): accepted targets ---------------------------------------

# (raw target, canonical path, decoded segments)
ACCEPTED = [
    P("/", "/", (), id="root"),
    P("/api/admin/x", "/api/admin/x", ("api", "admin", "x"), id="plain"),
    # the path tricks
    P("/api/public/../admin/x", "/api/admin/x", ("api", "admin", "x"), id="issue-dotdot"),
    P("/api/%61dmin/x", "/api/admin/x", ("api", "admin", "x"), id="issue-encoded-a"),
    P("//api/admin/x", "/api/admin/x", ("api", "admin", "x"), id="issue-double-slash"),
    # empty segments collapse
    P("/api//admin///x", "/api/admin/x", ("api", "admin", "x"), id="inner-slashes"),
    P("//w", "/w", ("w",), id="N-07-double-slash"),
    P("///", "/", (), id="only-slashes"),
    # trailing slash is kept
    P("/w/", "/w/", ("w",), id="N-07-trailing-slash"),
    P("/api/admin/", "/api/admin/", ("api", "admin"), id="trailing-slash"),
    P("/a//", "/a/", ("a",), id="trailing-double-slash"),
    P("/a/./", "/a/", ("a",), id="trailing-dot-slash"),
    P("/a/b/../c/", "/a/c/", ("a", "c"), id="dotdot-then-trailing-slash"),
    # dot segments (N-04)
    P("/pub/../w", "/w", ("w",), id="N-04-dotdot"),
    P("/pub/%2e%2e/w", "/w", ("w",), id="N-04-encoded-dotdot"),
    P("/pub/.%2E/w", "/w", ("w",), id="N-04-half-encoded-dotdot"),
    P("/./w", "/w", ("w",), id="N-04-dot"),
    P("/pub/%2E/w", "/pub/w", ("pub", "w"), id="encoded-dot"),
    P("/api/./admin", "/api/admin", ("api", "admin"), id="inner-dot"),
    P("/a/..", "/", (), id="dotdot-back-to-root"),
    P("/a/b/../..", "/", (), id="two-dotdots-back-to-root"),
    P("/.", "/", (), id="root-dot"),
    P("/a/b/c/./../../g", "/a/g", ("a", "g"), id="rfc3986-5.2.4-example"),
    P("/...", "/...", ("...",), id="three-dots-is-a-name"),
    P("/a/.b/..c", "/a/.b/..c", ("a", ".b", "..c"), id="dot-prefixed-names"),
    # unreserved characters are decoded (N-02)
    P("/%77", "/w", ("w",), id="N-02-encoded-w"),
    P("/%7Ex", "/~x", ("~x",), id="N-02-encoded-tilde"),
    P("/%7ex", "/~x", ("~x",), id="encoded-tilde-lower"),
    P("/%41%5a%30%39%2D%5F%2e", "/AZ09-_.", ("AZ09-_.",), id="all-unreserved-kinds"),
    # other encodings are kept, hex upper-cased
    P("/a%20b", "/a%20b", ("a b",), id="space-kept-encoded"),
    P("/a%3fb", "/a%3Fb", ("a?b",), id="encoded-question-upper-cased"),
    P("/w%3Fx=1", "/w%3Fx=1", ("w?x=1",), id="N-06-encoded-question-is-one-segment"),
    P("/a%23b", "/a%23b", ("a#b",), id="encoded-hash"),
    P("/a%3bb", "/a%3Bb", ("a;b",), id="encoded-semicolon"),
    P("/100%25", "/100%25", ("100%",), id="encoded-percent"),
    P("/%2541", "/%2541", ("%41",), id="double-encoded-letter-is-harmless"),
    P("/a%2a", "/a%2A", ("a*",), id="encoded-sub-delim-kept"),
    # raw characters allowed by RFC 3986 pchar
    P("/!$&'()*+,=:@", "/!$&'()*+,=:@", ("!$&'()*+,=:@",), id="raw-sub-delims"),
    P("/a~b-c_d.e", "/a~b-c_d.e", ("a~b-c_d.e",), id="raw-unreserved"),
]


@pytest.mark.parametrize(("raw", "path", "segments"), ACCEPTED)
def test_canonicalize_accepts(raw: str, path: str, segments: tuple[str, ...]) -> None:
    assert canonicalize(raw) == CanonicalPath(path, "", False, segments)
    assert canonicalize(raw).target == path


@pytest.mark.parametrize(("raw", "path", "segments"), ACCEPTED)
def test_canonical_form_is_a_fixed_point(raw: str, path: str, segments: tuple[str, ...]) -> None:
    """What the gateway forwards canonicalizes to itself: the backend sees what was judged."""
    once = canonicalize(raw)
    assert canonicalize(once.target) == once


# (raw target, canonical path, query, has_query, forwarded target)
QUERIES = [
    P("/a", "/a", "", False, "/a", id="no-query"),
    P("/a?", "/a", "", True, "/a?", id="empty-query-kept"),
    P("/a?x=1&y=2", "/a", "x=1&y=2", True, "/a?x=1&y=2", id="simple-query"),
    P("/a?y=%2F&z=%2e%2e", "/a", "y=%2F&z=%2e%2e", True, "/a?y=%2F&z=%2e%2e", id="verbatim"),
    P("/a/../b?q=/../", "/b", "q=/../", True, "/b?q=/../", id="query-dots-untouched"),
    P("/%61?%61", "/a", "%61", True, "/a?%61", id="query-not-decoded"),
    P("/a?b?c", "/a", "b?c", True, "/a?b?c", id="second-question-mark"),
    P("//x/?k=v", "/x/", "k=v", True, "/x/?k=v", id="path-normalized-query-kept"),
    P("/?", "/", "", True, "/?", id="root-empty-query"),
]


@pytest.mark.parametrize(("raw", "path", "query", "has_query", "target"), QUERIES)
def test_canonicalize_keeps_query_verbatim(
    raw: str, path: str, query: str, has_query: bool, target: str
) -> None:
    c = canonicalize(raw)
    assert (c.path, c.query, c.has_query, c.target) == (path, query, has_query, target)


# --- canonicalize(): rejected targets ---------------------------------------

REJECTED = [
    # encoded "/" (N-03)
    P("/api/admin%2Fx", id="issue-encoded-slash"),
    P("/api/admin%2fx", id="encoded-slash-lower"),
    P("/w%2Fx", id="N-03-encoded-slash"),
    P("/pub%2F..%2Fw", id="N-03-encoded-slash-dotdot"),
    P("/%2F", id="encoded-slash-alone"),
    # backslash, raw or encoded
    P("/a%5Cb", id="encoded-backslash"),
    P("/a%5cb", id="encoded-backslash-lower"),
    P("/a\\b", id="raw-backslash"),
    P("/pub\\..\\w", id="N-07-backslash-dotdot"),
    # NUL (N-06)
    P("/w%00.png", id="N-06-nul"),
    P("/%00", id="nul-alone"),
    # invalid percent-encoding
    P("/%zz", id="invalid-hex"),
    P("/a%g0", id="invalid-first-hex"),
    P("/a%0g", id="invalid-second-hex"),
    P("/a%", id="trailing-percent"),
    P("/a%2", id="truncated-percent"),
    P("/a%/b", id="percent-before-slash"),
    P("/a%%41", id="percent-percent"),
    P("/a%?x", id="percent-before-query"),
    # double encodings of dot, slash, backslash, NUL (N-05)
    P("/pub/%252e%252e/w", id="N-05-double-encoded-dotdot"),
    P("/%252e", id="double-encoded-dot"),
    P("/%252E", id="double-encoded-dot-upper"),
    P("/a%252fb", id="double-encoded-slash"),
    P("/a%252Fb", id="double-encoded-slash-upper"),
    P("/a%255cb", id="double-encoded-backslash"),
    P("/a%2500", id="double-encoded-nul"),
    # ... also when the second-level hex digits are themselves encoded: one decoding
    # gives "%2e", a second gives "."; the canonical form would forward "%252e".
    P("/pub/%252%65%252%65/w", id="double-encoded-dotdot-via-encoded-e"),
    P("/%25%32%65", id="double-encoded-dot-all-digits-encoded"),
    P("/%25%32e", id="double-encoded-dot-encoded-2"),
    P("/a%25%32%66b", id="double-encoded-slash-digits-encoded"),
    P("/a%25%35%63b", id="double-encoded-backslash-digits-encoded"),
    P("/a%25%30%30", id="double-encoded-nul-digits-encoded"),
    # ";" parameters, including a dot segment hiding behind them (N-07)
    P("/pub/..;/w", id="N-07-dotdot-semicolon"),
    P("/..;x", id="dotdot-params"),
    P("/.;x/w", id="dot-params"),
    P("/w;x=1", id="N-07-matrix-param"),
    P("/a;", id="bare-semicolon"),
    P("/;/a", id="semicolon-segment"),
    # climbing above the root
    P("/..", id="root-dotdot"),
    P("/a/../..", id="climb-after-pop"),
    P("/%2e%2e", id="root-encoded-dotdot"),
    P("/./..", id="dot-then-dotdot"),
    P("/../a", id="dotdot-first"),
    P("/a/%2E%2E/%2e%2e/b", id="encoded-climb"),
    # fragments
    P("/a#b", id="fragment"),
    P("/a?x#y", id="fragment-after-query"),
    P("/#", id="empty-fragment"),
    # not an absolute path
    P("*", id="asterisk-form"),
    P("http://x", id="absolute-form"),
    P("http://x/a", id="absolute-form-with-path"),
    P("", id="empty"),
    P("a/b", id="relative"),
    P("?x", id="query-only"),
    P(" /a", id="leading-space"),
    # raw non-ASCII (mitmproxy hands undecodable bytes over surrogate-escaped)
    P("/caf\udcc3\udca9", id="surrogate-escaped-utf8"),
    P("/café", id="raw-non-ascii"),
    P("/a?caf\udcc3\udca9", id="surrogate-escaped-in-query"),
    # control characters and characters outside pchar
    P("/a\x00b", id="raw-nul"),
    P("/a\tb", id="tab"),
    P("/a\nb", id="newline"),
    P("/a\r\nHost: evil", id="crlf"),
    P("/a\x7fb", id="del"),
    P("/a?x\r\nHost: evil", id="crlf-in-query"),
    P("/a?x\x00", id="nul-in-query"),
    P("/a?x\x7f", id="del-in-query"),
    P("/a b", id="raw-space"),
    P('/a"b', id="double-quote"),
    P("/a<b>", id="angle-brackets"),
    P("/a{b}", id="braces"),
    P("/a|b", id="pipe"),
    P("/a^b", id="caret"),
    P("/a`b", id="backtick"),
    P("/a[b]", id="square-brackets"),
]


@pytest.mark.parametrize("raw", REJECTED)
def test_canonicalize_rejects(raw: str) -> None:
    with pytest.raises(AmbiguousPath):
        canonicalize(raw)


def test_ambiguous_path_is_a_value_error() -> None:
    assert issubclass(AmbiguousPath, ValueError)


# Dot segments are removed with RFC 3986 §5.2.4 remove_dot_segments (N-04): a final
# "." or ".." leaves the path ending in "/".
@pytest.mark.parametrize(
    ("raw", "path", "segments"),
    [
        P("/a/b/..", "/a/", ("a",), id="final-dotdot"),
        P("/a/.", "/a/", ("a",), id="final-dot"),
        P("/a/b/%2e%2e", "/a/", ("a",), id="final-encoded-dotdot"),
    ],
)
def test_final_dot_segment_leaves_trailing_slash(
    raw: str, path: str, segments: tuple[str, ...]
) -> None:
    assert canonicalize(raw) == CanonicalPath(path, "", False, segments)


# Percent-encoded octets are UTF-8 (RFC 3986 §2.5): decoded segments, and so the
# captured `{name}` values compared with token claims, are the characters the
# backend will see, not one Latin-1 character per octet.
@pytest.mark.parametrize(
    ("raw", "path", "segments"),
    [
        P("/users/jos%C3%A9", "/users/jos%C3%A9", ("users", "josé"), id="e-acute"),
        P("/caf%c3%a9", "/caf%C3%A9", ("café",), id="lower-hex"),
        P("/%E2%82%AC", "/%E2%82%AC", ("€",), id="euro-sign"),
    ],
)
def test_encoded_utf8_decodes_to_characters(raw: str, path: str, segments: tuple[str, ...]) -> None:
    assert canonicalize(raw) == CanonicalPath(path, "", False, segments)


# --- PathPattern.parse() ----------------------------------------------------

# (pattern, parts, params, rest)
PATTERNS = [
    P("/", (), (), False, id="root"),
    P("/api/admin", ("api", "admin"), (), False, id="literals"),
    P("/api/admin/", ("api", "admin"), (), False, id="trailing-slash-dropped"),
    P("/users/{id}", ("users", None), ((1, "id"),), False, id="param"),
    P(
        "/u/{user_id}/posts/{Post2}",
        ("u", None, "posts", None),
        ((1, "user_id"), (3, "Post2")),
        False,
        id="two-params",
    ),
    P("/{_x}", (None,), ((0, "_x"),), False, id="underscore-param"),
    P("/a/*/c", ("a", None, "c"), (), False, id="star"),
    P("/a/**", ("a",), (), True, id="double-star"),
    P("/a/**/", ("a",), (), True, id="double-star-trailing-slash"),
    P("/**", (), (), True, id="root-double-star"),
    P("/u/{id}/**", ("u", None), ((1, "id"),), True, id="param-then-rest"),
    P("/%61dmin", ("admin",), (), False, id="encoded-unreserved-decoded"),
    P("/a%20b", ("a b",), (), False, id="encoded-space-decoded"),
    P("/.well-known/x", (".well-known", "x"), (), False, id="dot-prefixed-literal"),
]


@pytest.mark.parametrize(("text", "parts", "params", "rest"), PATTERNS)
def test_pattern_parse(
    text: str,
    parts: tuple[str | None, ...],
    params: tuple[tuple[int, str], ...],
    rest: bool,
) -> None:
    assert PathPattern.parse(text) == PathPattern(text, parts, params, rest)


def test_pattern_param_names() -> None:
    assert PathPattern.parse("/u/{a}/x/{b}/**").param_names == frozenset({"a", "b"})
    assert PathPattern.parse("/u/*/x").param_names == frozenset()


BAD_PATTERNS = [
    P("", id="empty"),
    P("api/admin", id="no-leading-slash"),
    P("*", id="bare-star"),
    P("/a/**/b", id="double-star-not-last"),
    P("/**/**", id="two-double-stars"),
    P("/{id}/{id}", id="duplicate-param"),
    P("/{id}/x/{id}/**", id="duplicate-param-apart"),
    P("/{bad", id="unclosed-brace"),
    P("/bad}", id="stray-close-brace"),
    P("/{}", id="empty-param"),
    P("/{1x}", id="param-starts-with-digit"),
    P("/{a-b}", id="param-with-dash"),
    P("/x{id}", id="param-inside-literal"),
    P("/a*b", id="star-inside-literal"),
    P("/a*", id="star-suffix"),
    P("/**x", id="double-star-prefix"),
    P("/***", id="triple-star"),
    P("/.", id="dot"),
    P("/..", id="dotdot"),
    P("/a/../b", id="inner-dotdot"),
    P("/a/./b", id="inner-dot"),
    P("//a", id="leading-empty-segment"),
    P("/a//b", id="inner-empty-segment"),
    P("/a%2Fb", id="encoded-slash"),
    P("/a%zz", id="bad-percent"),
    P("/a;b", id="semicolon"),
    P("/a\\b", id="backslash"),
    P("/a b", id="space"),
]


@pytest.mark.parametrize("text", BAD_PATTERNS)
def test_pattern_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        PathPattern.parse(text)


# --- PathPattern.match() ----------------------------------------------------

# (pattern, request target, parameters or None)
MATCHES = [
    P("/api/admin", "/api/admin", {}, id="literal"),
    P("/api/admin", "/api/admin/", {}, id="literal-vs-trailing-slash"),
    P("/api/admin/", "/api/admin", {}, id="trailing-slash-pattern"),
    P("/api/admin", "/api/admin/x", None, id="literal-too-long"),
    P("/api/admin", "/api", None, id="literal-too-short"),
    P("/api/admin", "/API/admin", None, id="case-sensitive"),
    P("/api/admin", "/api/public/../admin", {}, id="after-dot-removal"),
    P("/api/admin", "/api/%61dmin", {}, id="encoded-request"),
    P("/%61dmin", "/admin", {}, id="encoded-pattern"),
    P("/a%20b", "/a%20b", {}, id="encoded-space-both"),
    P("/", "/", {}, id="root"),
    P("/", "/a", None, id="root-vs-path"),
    P("/users/{id}", "/users/42", {"id": "42"}, id="param"),
    P("/users/{id}", "/users/a%20b", {"id": "a b"}, id="param-decoded"),
    P("/users/{id}", "/users/%7Efoo", {"id": "~foo"}, id="param-decoded-unreserved"),
    P("/users/{id}", "/users/w%3Fx=1", {"id": "w?x=1"}, id="param-encoded-question"),
    P("/users/{id}", "/users", None, id="param-missing"),
    P("/users/{id}", "/users/", None, id="param-missing-trailing-slash"),
    P("/users/{id}", "/users/42/x", None, id="param-one-segment-only"),
    P("/users/{id}/p/{post}", "/users/7/p/9", {"id": "7", "post": "9"}, id="two-params"),
    P("/users/{id}/p/{post}", "/users/7/q/9", None, id="two-params-literal-differs"),
    P("/a/*/c", "/a/b/c", {}, id="star"),
    P("/a/*/c", "/a/c", None, id="star-needs-a-segment"),
    P("/a/*/c", "/a/b/b/c", None, id="star-one-segment-only"),
    P("/a/**", "/a", {}, id="rest-empty"),
    P("/a/**", "/a/", {}, id="rest-empty-trailing-slash"),
    P("/a/**", "/a/b", {}, id="rest-one"),
    P("/a/**", "/a/b/c/d", {}, id="rest-many"),
    P("/a/**", "/b", None, id="rest-wrong-prefix"),
    P("/a/**", "/ab", None, id="rest-not-a-string-prefix"),
    P("/a/**", "/", None, id="rest-too-short"),
    P("/**", "/", {}, id="root-rest-root"),
    P("/**", "/x/y", {}, id="root-rest-anything"),
    P("/u/{id}/**", "/u/7", {"id": "7"}, id="param-rest-empty"),
    P("/u/{id}/**", "/u/7/a/b", {"id": "7"}, id="param-rest-many"),
    P("/u/{id}/**", "/u", None, id="param-rest-missing-param"),
]


@pytest.mark.parametrize(("pattern", "target", "expected"), MATCHES)
def test_pattern_match(pattern: str, target: str, expected: dict[str, str] | None) -> None:
    assert PathPattern.parse(pattern).match(canonicalize(target).segments) == expected


def test_pattern_match_raw_segments() -> None:
    pattern = PathPattern.parse("/files/{name}")
    assert pattern.match(("files", "a/b")) == {"name": "a/b"}
    assert pattern.match(("files",)) is None
    assert pattern.match(()) is None
