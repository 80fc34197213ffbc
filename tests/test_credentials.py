"""Credentials as tables: `authgate.credentials` (API keys, htpasswd/Basic,
`find()` and `check()`).

Conformance checks: B-05 (credentials sent two ways, repeated parameters),
B-08 (query tokens only where configured), BA-02 (user-id ends at the first
colon; UTF-8), BA-03 (malformed Basic credentials), H-04 (scheme is
case-insensitive, 1*SP), H-07 (duplicate Authorization fields).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import bcrypt
import pytest

from authgate.credentials import (
    API_KEY,
    BASIC,
    JWT,
    Ambiguous,
    ApiKey,
    ApiKeys,
    BasicUser,
    BasicUsers,
    Presented,
    check,
    find,
    hash_key,
    parse_htpasswd,
)
from authgate.identity import Identity
from authgate.jwks import RemoteKeys
from authgate.keys import jwks_for, mint, new_rsa_key
from authgate.policy import parse_policy
from authgate.tokens import Issuer, KeysUnavailable, TokenCache

NOW = 1_800_000_000.0
KEY = new_rsa_key()
OTHER_KEY = new_rsa_key()

POLICY = """
version: 1
authn:
  jwt:
    - name: t
      issuer: https://as.test
      audience: https://api.test
      algorithms: [RS256]
      jwks_file: jwks.json
rules: []
"""


def _load_issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    folder = tmp_path_factory.mktemp("credentials")
    (folder / "jwks.json").write_text(json.dumps(jwks_for(KEY, "k1")))
    return parse_policy(POLICY, str(folder / "p.yaml"), folder).issuers[0]


@pytest.fixture(scope="module")
def issuers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Issuer, ...]]:
    """Named issuer sets for the `find()` table."""
    t = _load_issuer(tmp_path_factory)
    q = dataclasses.replace(t, name="q", query_param="access_token")
    c = dataclasses.replace(t, name="c", cookie="at")
    qc = dataclasses.replace(t, name="qc", query_param="access_token", cookie="at")
    other = dataclasses.replace(
        t, name="other", issuer="https://other.test", query_param="token", cookie="sid"
    )
    return {
        "none": (),
        "plain": (t,),
        "query": (q,),
        "cookie": (c,),
        "both": (qc,),
        "two": (qc, other),
    }


def b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def tok(**kw: Any) -> str:
    kw.setdefault("sub", "alice")
    kw.setdefault("iss", "https://as.test")
    kw.setdefault("aud", "https://api.test")
    kw.setdefault("kid", "k1")
    kw.setdefault("now", NOW)
    return mint(kw.pop("key", KEY), **kw)


# Cost 8 keeps each bcrypt check around a few milliseconds.
HASH_PW = bcrypt.hashpw(b"pw", bcrypt.gensalt(8))
HASH_COLON = bcrypt.hashpw(b"pa:ss", bcrypt.gensalt(8))
HASH_POUND = bcrypt.hashpw("123£".encode(), bcrypt.gensalt(8))
HASH_LOW_COST = bcrypt.hashpw(b"pw", bcrypt.gensalt(4))

API_KEY_VALUE = "k-0123456789abcdef"
API_KEY_DIGEST = hashlib.sha256(API_KEY_VALUE.encode()).digest()
API_KEYS = ApiKeys(
    "x-api-key",
    {
        API_KEY_DIGEST: ApiKey(
            "ci", API_KEY_DIGEST, frozenset({"deployer"}), frozenset({"deploy", "read"})
        )
    },
)


def basic_users() -> BasicUsers:
    return BasicUsers(
        {
            "alice": BasicUser("alice", HASH_PW, frozenset({"admin"}), frozenset({"read"})),
            "bob": BasicUser("bob", HASH_COLON, frozenset(), frozenset()),
            "test": BasicUser("test", HASH_POUND, frozenset(), frozenset({"x"})),
            # htpasswd -B writes $2y$; Apache's older tools $2a$. Same algorithm as $2b$.
            "yves": BasicUser("yves", b"$2y$" + HASH_PW[4:], frozenset(), frozenset()),
            "ada": BasicUser("ada", b"$2a$" + HASH_PW[4:], frozenset(), frozenset()),
        }
    )


# --- hash_key / ApiKeys ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "digest"),
    [
        ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        # UTF-8 bytes of "£" are c2 a3
        ("£", hashlib.sha256(b"\xc2\xa3").hexdigest()),
    ],
    ids=["abc-vector", "empty-vector", "utf8"],
)
def test_hash_key(key: str, digest: str) -> None:
    assert hash_key(key) == digest


def test_hash_key_matches_what_verify_looks_up() -> None:
    assert bytes.fromhex(hash_key(API_KEY_VALUE)) == API_KEY_DIGEST


def test_api_key_right_key_gives_identity() -> None:
    who = API_KEYS.verify(API_KEY_VALUE)
    assert who == Identity(
        "ci",
        "api-key",
        "api_key",
        frozenset({"deployer"}),
        frozenset({"deploy", "read"}),
        {"sub": "ci"},
    )


@pytest.mark.parametrize(
    "presented",
    [
        "k-0123456789abcdeX",
        "",
        "k-0123456789abcde",
        API_KEY_VALUE + " ",
        API_KEY_VALUE.upper(),
        API_KEY_DIGEST.hex(),
        "\udcff",  # a lone surrogate (undecodable header byte) must not crash
    ],
    ids=[
        "last-char-differs",
        "empty",
        "truncated",
        "trailing-space",
        "upper-case",
        "the-digest-itself",
        "surrogate",
    ],
)
def test_api_key_wrong_key_is_none(presented: str) -> None:
    assert API_KEYS.verify(presented) is None


# --- parse_htpasswd -----------------------------------------------------------------------


H = HASH_PW.decode()
H2 = HASH_COLON.decode()


@pytest.mark.parametrize(
    ("text", "users"),
    [
        (f"alice:{H}\n", {"alice": H}),
        (f"alice:$2y${H[4:]}\n", {"alice": f"$2y${H[4:]}"}),
        (f"alice:$2a${H[4:]}\n", {"alice": f"$2a${H[4:]}"}),
        (f"alice:{H}", {"alice": H}),
        (f"alice:{H}\r\nbob:{H2}\r\n", {"alice": H, "bob": H2}),
        (
            f"# users\n\n   \nalice:{H}\n  # indented comment\n\t\nbob:{H2}\n",
            {"alice": H, "bob": H2},
        ),
        (f"  alice:{H}  \n", {"alice": H}),
        ("", {}),
        ("# only a comment\n", {}),
        (f"alice:$2b$08${H[7:]}\n", {"alice": f"$2b$08${H[7:]}"}),
        (f"alice:$2b$12${H[7:]}\n", {"alice": f"$2b$12${H[7:]}"}),
    ],
    ids=[
        "bcrypt-2b",
        "bcrypt-2y",
        "bcrypt-2a",
        "no-final-newline",
        "crlf",
        "comments-and-blank-lines",
        "surrounding-spaces",
        "empty-file",
        "only-comments",
        "cost-8-is-enough",
        "cost-12",
    ],
)
def test_parse_htpasswd_accepts(text: str, users: dict[str, str]) -> None:
    parsed, problem = parse_htpasswd(text)
    assert problem is None
    assert parsed == {u: h.encode() for u, h in users.items()}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "alice:$apr1$JxSX5TkP$fJOXOsAvW.0x4jr0U8V7a0\n",
            (1, "user 'alice' has an apr1/MD5 hash; only bcrypt is accepted (htpasswd -B)"),
        ),
        (
            "alice:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n",
            (1, "user 'alice' has a SHA-1 hash; only bcrypt is accepted (htpasswd -B)"),
        ),
        (
            "alice:rqXexS6ZhobKA\n",
            (1, "user 'alice' has a crypt/plain-text hash; only bcrypt is accepted (htpasswd -B)"),
        ),
        (
            "alice:secret\n",
            (1, "user 'alice' has a crypt/plain-text hash; only bcrypt is accepted (htpasswd -B)"),
        ),
        (
            "alice:\n",
            (1, "user 'alice' has a crypt/plain-text hash; only bcrypt is accepted (htpasswd -B)"),
        ),
        (
            f"alice:$2x${H[4:]}\n",
            (1, "user 'alice' has a crypt/plain-text hash; only bcrypt is accepted (htpasswd -B)"),
        ),
        ("alice\n", (1, "expected user:hash")),
        (f":{H}\n", (1, "expected user:hash")),
        (f"alice:{H}\nalice:{H2}\n", (2, "user 'alice' appears twice")),
        (
            f"alice:{HASH_LOW_COST.decode()}\n",
            (1, "user 'alice': bcrypt cost 04 is too low (>= 8)"),
        ),
        (f"alice:$2b$07${H[7:]}\n", (1, "user 'alice': bcrypt cost 07 is too low (>= 8)")),
        (
            f"# comment\n\nalice:{H}\nbob:secret\n",
            (4, "user 'bob' has a crypt/plain-text hash; only bcrypt is accepted (htpasswd -B)"),
        ),
    ],
    ids=[
        "apr1",
        "sha1",
        "crypt",
        "plain-text",
        "empty-hash",
        "bcrypt-2x-prefix",
        "missing-colon",
        "empty-user",
        "duplicate-user",
        "cost-04",
        "cost-07",
        "line-number-counts-comments-and-blanks",
    ],
)
def test_parse_htpasswd_refuses(text: str, problem: tuple[int, str]) -> None:
    assert parse_htpasswd(text)[1] == problem


def test_parse_htpasswd_refuses_a_cost_bcrypt_cannot_check() -> None:
    # bcrypt costs stop at 31: a hash claiming cost 32 makes every check of that
    # user raise ValueError("Invalid salt") at request time. The parser, whose job
    # is to catch bad hashes when the policy loads, lets it through.
    hashed = f"$2b$32${H[7:]}"
    with pytest.raises(ValueError, match="Invalid salt"):
        bcrypt.checkpw(b"pw", hashed.encode())
    _users, problem = parse_htpasswd(f"alice:{hashed}\n")
    assert problem is not None, "cost 32 accepted; bcrypt.checkpw raises on it"
    assert problem[0] == 1
    assert "32" in problem[1]


# --- BasicUsers.check ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "password", "ok"),
    [
        ("alice", "pw", True),
        ("bob", "pa:ss", True),
        ("test", "123£", True),
        ("yves", "pw", True),
        ("ada", "pw", True),
        ("alice", "PW", False),
        ("alice", "pw ", False),
        ("alice", "", False),
        ("bob", "pa", False),
        ("test", "123", False),
        ("mallory", "pw", False),
        ("", "pw", False),
        ("Alice", "pw", False),
    ],
    ids=[
        "right-password",
        "password-with-colon",
        "utf8-password",
        "hash-2y",
        "hash-2a",
        "wrong-case",
        "trailing-space",
        "empty-password",
        "colon-password-cut-short",
        "utf8-password-cut-short",
        "unknown-user",
        "empty-user",
        "user-name-is-case-sensitive",
    ],
)
def test_basic_check(user: str, password: str, ok: bool) -> None:
    assert basic_users().check(user, password, 0.0) is ok


@pytest.fixture
def checkpw_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Counts bcrypt.checkpw calls (each one records the password tried)."""
    calls: list[bytes] = []
    real: Callable[[bytes, bytes], bool] = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


def test_basic_success_is_remembered(checkpw_calls: list[bytes]) -> None:
    users = basic_users()
    assert users.cached("alice", "pw", 0.0) is None
    assert users.check("alice", "pw", 0.0) is True
    assert len(checkpw_calls) == 1
    assert users.cached("alice", "pw", 1.0) is True
    assert users.check("alice", "pw", 1.0) is True
    assert users.check("alice", "pw", 299.0) is True
    assert len(checkpw_calls) == 1
    # after `remember` (300 s) bcrypt runs again
    assert users.check("alice", "pw", 301.0) is True
    assert len(checkpw_calls) == 2


def test_basic_failure_is_remembered_briefly(checkpw_calls: list[bytes]) -> None:
    users = basic_users()
    assert users.check("alice", "wrong", 0.0) is False
    assert users.check("alice", "wrong", 9.0) is False
    assert len(checkpw_calls) == 1
    assert users.cached("alice", "wrong", 9.0) is False
    # the failure window (10 s) has passed: bcrypt again
    assert users.cached("alice", "wrong", 11.0) is None
    assert users.check("alice", "wrong", 11.0) is False
    assert len(checkpw_calls) == 2


def test_basic_remembered_success_does_not_cover_other_passwords(
    checkpw_calls: list[bytes],
) -> None:
    users = basic_users()
    assert users.check("alice", "pw", 0.0) is True
    assert users.check("alice", "pw2", 1.0) is False
    assert users.check("bob", "pw", 1.0) is False
    assert checkpw_calls == [b"pw", b"pw2", b"pw"]


def test_basic_remembered_failure_does_not_block_the_right_password(
    checkpw_calls: list[bytes],
) -> None:
    users = basic_users()
    assert users.check("alice", "typo", 0.0) is False
    assert users.check("alice", "pw", 1.0) is True
    assert len(checkpw_calls) == 2


def test_basic_cache_keys_do_not_hold_the_password() -> None:
    users = basic_users()
    users.check("alice", "pw", 0.0)
    assert len(users._known) == 1
    (key,) = users._known
    assert b"pw" not in key and b"alice" not in key
    assert len(key) == 32


# --- find() -------------------------------------------------------------------------------

BEARER = [("authorization", "Bearer tok")]
NOT_UTF8 = b64(b"alice:\xa3")  # latin-1 "£": not UTF-8

# (id, issuer set, basic accepted, api keys accepted, headers, query,
#  expected presented as (kind, via, value, issuer names) or None, malformed)
FOUND: list[tuple[Any, ...]] = [
    ("bearer", "plain", True, True, BEARER, "", (JWT, "authorization", "tok", ("t",)), False),
    (
        "bearer-lower-case",
        "plain",
        True,
        True,
        [("authorization", "bearer tok")],
        "",
        (JWT, "authorization", "tok", ("t",)),
        False,
    ),
    (
        "bearer-upper-case",
        "plain",
        True,
        True,
        [("authorization", "BEARER tok")],
        "",
        (JWT, "authorization", "tok", ("t",)),
        False,
    ),
    (
        "bearer-mixed-case",
        "plain",
        True,
        True,
        [("authorization", "bEaReR tok")],
        "",
        (JWT, "authorization", "tok", ("t",)),
        False,
    ),
    (
        "bearer-two-spaces",
        "plain",
        True,
        True,
        [("authorization", "Bearer  tok")],
        "",
        (JWT, "authorization", "tok", ("t",)),
        False,
    ),
    (
        "bearer-surrounding-spaces",
        "plain",
        True,
        True,
        [("authorization", "  Bearer tok  ")],
        "",
        (JWT, "authorization", "tok", ("t",)),
        False,
    ),
    (
        "bearer-token68-padding",
        "plain",
        True,
        True,
        [("authorization", "Bearer abc==")],
        "",
        (JWT, "authorization", "abc==", ("t",)),
        False,
    ),
    (
        "bearer-without-token",
        "plain",
        True,
        True,
        [("authorization", "Bearer")],
        "",
        (JWT, "authorization", "", ("t",)),
        False,
    ),
    (
        "bearer-all-issuers",
        "two",
        True,
        True,
        BEARER,
        "",
        (JWT, "authorization", "tok", ("qc", "other")),
        False,
    ),
    ("bearer-not-accepted-by-rule", "none", True, True, BEARER, "", None, False),
    (
        "basic",
        "plain",
        True,
        True,
        [("authorization", f"Basic {b64('alice:pw')}")],
        "",
        (BASIC, "authorization", "alice:pw", ()),
        False,
    ),
    (
        "basic-lower-case",
        "plain",
        True,
        True,
        [("authorization", f"basic {b64('alice:pw')}")],
        "",
        (BASIC, "authorization", "alice:pw", ()),
        False,
    ),
    (
        "basic-password-with-colon",
        "plain",
        True,
        True,
        [("authorization", "Basic YWxpY2U6cGE6c3M=")],
        "",
        (BASIC, "authorization", "alice:pa:ss", ()),
        False,
    ),
    (
        "basic-utf8",
        "plain",
        True,
        True,
        [("authorization", "Basic dGVzdDoxMjPCow==")],
        "",
        (BASIC, "authorization", "test:123£", ()),
        False,
    ),
    (
        "basic-empty-password",
        "plain",
        True,
        True,
        [("authorization", f"Basic {b64('alice:')}")],
        "",
        (BASIC, "authorization", "alice:", ()),
        False,
    ),
    ("basic-no-colon", "plain", True, True, [("authorization", "Basic Zm9v")], "", None, True),
    ("basic-not-base64", "plain", True, True, [("authorization", "Basic !!!")], "", None, True),
    (
        "basic-nul",
        "plain",
        True,
        True,
        [("authorization", f"Basic {b64('a' + chr(0) + ':b')}")],
        "",
        None,
        True,
    ),
    (
        "basic-newline-in-password",
        "plain",
        True,
        True,
        [("authorization", f"Basic {b64('a:b' + chr(10))}")],
        "",
        None,
        True,
    ),
    (
        "basic-del",
        "plain",
        True,
        True,
        [("authorization", f"Basic {b64('a:b' + chr(127))}")],
        "",
        None,
        True,
    ),
    (
        "basic-not-utf8",
        "plain",
        True,
        True,
        [("authorization", f"Basic {NOT_UTF8}")],
        "",
        None,
        True,
    ),
    ("basic-empty", "plain", True, True, [("authorization", "Basic")], "", None, True),
    (
        "basic-not-accepted-by-rule",
        "plain",
        False,
        True,
        [("authorization", f"Basic {b64('alice:pw')}")],
        "",
        None,
        False,
    ),
    (
        "digest",
        "plain",
        True,
        True,
        [("authorization", 'Digest username="alice"')],
        "",
        None,
        False,
    ),
    ("negotiate", "plain", True, True, [("authorization", "Negotiate YII=")], "", None, False),
    ("empty-authorization", "plain", True, True, [("authorization", "")], "", None, False),
    (
        "api-key",
        "plain",
        True,
        True,
        [("x-api-key", API_KEY_VALUE)],
        "",
        (API_KEY, "x-api-key", API_KEY_VALUE, ()),
        False,
    ),
    (
        "api-key-padded",
        "plain",
        True,
        True,
        [("x-api-key", f"  {API_KEY_VALUE} ")],
        "",
        (API_KEY, "x-api-key", API_KEY_VALUE, ()),
        False,
    ),
    (
        "api-key-not-accepted-by-rule",
        "plain",
        True,
        False,
        [("x-api-key", API_KEY_VALUE)],
        "",
        None,
        False,
    ),
    (
        "api-key-beside-unsupported-scheme",
        "plain",
        True,
        True,
        [("authorization", "Digest x"), ("x-api-key", API_KEY_VALUE)],
        "",
        (API_KEY, "x-api-key", API_KEY_VALUE, ()),
        False,
    ),
    (
        "query-token",
        "query",
        True,
        True,
        [],
        "access_token=tok",
        (JWT, "query", "tok", ("q",)),
        False,
    ),
    (
        "query-token-among-others",
        "query",
        True,
        True,
        [],
        "a=1&access_token=tok&b=2",
        (JWT, "query", "tok", ("q",)),
        False,
    ),
    (
        "query-token-percent-encoded-name",
        "query",
        True,
        True,
        [],
        "access%5Ftoken=tok",
        (JWT, "query", "tok", ("q",)),
        False,
    ),
    ("query-token-not-configured", "plain", True, True, [], "access_token=tok", None, False),
    ("query-token-other-name", "query", True, True, [], "token=tok", None, False),
    (
        "query-token-picks-its-issuer",
        "two",
        True,
        True,
        [],
        "token=tok",
        (JWT, "query", "tok", ("other",)),
        False,
    ),
    ("query-token-not-accepted-by-rule", "none", True, True, [], "access_token=tok", None, False),
    (
        "cookie-token",
        "cookie",
        True,
        True,
        [("cookie", "at=tok")],
        "",
        (JWT, "cookie", "tok", ("c",)),
        False,
    ),
    (
        "cookie-token-among-others",
        "cookie",
        True,
        True,
        [("cookie", "theme=dark; at=tok; x=1")],
        "",
        (JWT, "cookie", "tok", ("c",)),
        False,
    ),
    (
        "cookie-token-second-field",
        "cookie",
        True,
        True,
        [("cookie", "theme=dark"), ("cookie", "at=tok")],
        "",
        (JWT, "cookie", "tok", ("c",)),
        False,
    ),
    (
        "cookie-token-picks-its-issuer",
        "two",
        True,
        True,
        [("cookie", "sid=tok")],
        "",
        (JWT, "cookie", "tok", ("other",)),
        False,
    ),
    ("cookie-token-not-configured", "plain", True, True, [("cookie", "at=tok")], "", None, False),
    ("cookie-other-name", "cookie", True, True, [("cookie", "session=tok")], "", None, False),
    ("cookie-not-accepted-by-rule", "none", True, True, [("cookie", "at=tok")], "", None, False),
    # Browsers store and send cookie values with spaces, quotes or braces; an
    # unrelated cookie like that must not hide the token cookie.
    (
        "cookie-token-beside-cookie-with-space",
        "cookie",
        True,
        True,
        [("cookie", "at=tok; prefs=a b")],
        "",
        (JWT, "cookie", "tok", ("c",)),
        False,
    ),
    (
        "cookie-token-beside-json-cookie",
        "cookie",
        True,
        True,
        [("cookie", 'consent={"ads":false}; at=tok')],
        "",
        (JWT, "cookie", "tok", ("c",)),
        False,
    ),
    (
        "cookie-and-bearer-bearer-wins",
        "cookie",
        True,
        True,
        [("cookie", "at=ck"), ("authorization", "Bearer tok")],
        "",
        (JWT, "authorization", "tok", ("c",)),
        False,
    ),
    (
        "cookie-and-api-key-key-wins",
        "cookie",
        True,
        True,
        [("cookie", "at=ck"), ("x-api-key", API_KEY_VALUE)],
        "",
        (API_KEY, "x-api-key", API_KEY_VALUE, ()),
        False,
    ),
    (
        "cookie-and-basic-basic-wins",
        "cookie",
        True,
        True,
        [("cookie", "at=ck"), ("authorization", f"Basic {b64('alice:pw')}")],
        "",
        (BASIC, "authorization", "alice:pw", ()),
        False,
    ),
    (
        "cookie-and-query-query-wins",
        "both",
        True,
        True,
        [("cookie", "at=ck")],
        "access_token=tok",
        (JWT, "query", "tok", ("qc",)),
        False,
    ),
    (
        "cookie-and-malformed-basic",
        "cookie",
        True,
        True,
        [("cookie", "at=ck"), ("authorization", "Basic Zm9v")],
        "",
        None,
        True,
    ),
    (
        "cookie-twice-not-a-token-cookie",
        "cookie",
        True,
        True,
        [("cookie", "x=1"), ("cookie", "x=2; at=tok")],
        "",
        (JWT, "cookie", "tok", ("c",)),
        False,
    ),
    ("nothing", "two", True, True, [("accept", "*/*")], "a=1", None, False),
]


@pytest.mark.parametrize(
    ("issuer_set", "with_basic", "with_keys", "headers", "query", "expected", "malformed"),
    [c[1:] for c in FOUND],
    ids=[c[0] for c in FOUND],
)
def test_find(
    issuers: dict[str, tuple[Issuer, ...]],
    issuer_set: str,
    with_basic: bool,
    with_keys: bool,
    headers: list[tuple[str, str]],
    query: str,
    expected: tuple[str, str, str, tuple[str, ...]] | None,
    malformed: bool,
) -> None:
    presented, bad = find(
        issuers[issuer_set],
        API_KEYS if with_keys else None,
        basic_users() if with_basic else None,
        headers,
        query,
    )
    if expected is None:
        assert presented is None
    else:
        assert presented is not None
        assert (
            presented.kind,
            presented.via,
            presented.value,
            tuple(i.name for i in presented.issuers),
        ) == expected
    if malformed:
        assert bad == Presented(BASIC, "authorization", "")
    else:
        assert bad is None


AMBIGUOUS: list[tuple[Any, ...]] = [
    (
        "two-authorization-fields",
        "plain",
        [("authorization", "Bearer a"), ("authorization", "Bearer b")],
        "",
        "more than one Authorization field",
    ),
    (
        "two-authorization-fields-different-schemes",
        "plain",
        [("authorization", f"Basic {b64('alice:pw')}"), ("authorization", "Bearer b")],
        "",
        "more than one Authorization field",
    ),
    (
        "two-authorization-fields-rule-takes-no-jwt",
        "none",
        [("authorization", "Digest a"), ("authorization", "Digest b")],
        "",
        "more than one Authorization field",
    ),
    (
        "api-key-twice",
        "plain",
        [("x-api-key", "a"), ("x-api-key", "b")],
        "",
        "more than one x-api-key field",
    ),
    (
        "api-key-twice-same-value",
        "plain",
        [("x-api-key", API_KEY_VALUE), ("x-api-key", API_KEY_VALUE)],
        "",
        "more than one x-api-key field",
    ),
    (
        "bearer-and-api-key",
        "plain",
        [*BEARER, ("x-api-key", API_KEY_VALUE)],
        "",
        "credentials sent in more than one way",
    ),
    (
        "basic-and-api-key",
        "plain",
        [("authorization", f"Basic {b64('alice:pw')}"), ("x-api-key", API_KEY_VALUE)],
        "",
        "credentials sent in more than one way",
    ),
    (
        "malformed-basic-and-api-key",
        "plain",
        [("authorization", "Basic Zm9v"), ("x-api-key", API_KEY_VALUE)],
        "",
        "credentials sent in more than one way",
    ),
    (
        "bearer-and-query-token",
        "query",
        BEARER,
        "access_token=tok2",
        "credentials sent in more than one way",
    ),
    (
        "basic-and-query-token",
        "query",
        [("authorization", f"Basic {b64('alice:pw')}")],
        "access_token=tok",
        "credentials sent in more than one way",
    ),
    (
        "api-key-and-query-token",
        "query",
        [("x-api-key", API_KEY_VALUE)],
        "access_token=tok",
        "credentials sent in more than one way",
    ),
    (
        "query-token-twice",
        "query",
        [],
        "access_token=a&access_token=b",
        "more than one access_token query parameter",
    ),
    (
        "query-token-twice-one-empty",
        "query",
        [],
        "access_token=&access_token=b",
        "more than one access_token query parameter",
    ),
    (
        "query-tokens-for-two-issuers",
        "two",
        [],
        "access_token=a&token=b",
        "credentials sent in more than one way",
    ),
    (
        "cookie-token-twice-two-fields",
        "cookie",
        [("cookie", "at=a"), ("cookie", "at=b")],
        "",
        "more than one at cookie",
    ),
    # One Cookie field is how HTTP/1.1 browsers send every cookie: the same
    # name twice there (two paths or domains) is as ambiguous as in two fields.
    (
        "cookie-token-twice-one-field",
        "cookie",
        [("cookie", "at=a; at=b")],
        "",
        "more than one at cookie",
    ),
    # Query tokens for two issuers are ambiguous (above); cookies for two
    # issuers must not be settled by set iteration order (hash seed).
    ("cookie-tokens-for-two-issuers", "two", [("cookie", "at=a; sid=b")], "", "more than one"),
]


@pytest.mark.parametrize(
    ("issuer_set", "headers", "query", "message"),
    [c[1:] for c in AMBIGUOUS],
    ids=[c[0] for c in AMBIGUOUS],
)
def test_find_ambiguous(
    issuers: dict[str, tuple[Issuer, ...]],
    issuer_set: str,
    headers: list[tuple[str, str]],
    query: str,
    message: str,
) -> None:
    with pytest.raises(Ambiguous) as caught:
        find(issuers[issuer_set], API_KEYS, basic_users(), headers, query)
    assert str(caught.value).startswith(message)


# --- check() ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer(issuers: dict[str, tuple[Issuer, ...]]) -> Issuer:
    return issuers["plain"][0]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (lambda: tok(ttl=-10), "The access token expired"),
        (lambda: "not a token", "The access token is malformed"),
        (lambda: tok(key=OTHER_KEY), "The access token signature is invalid"),
        (lambda: tok(kid="k9"), "The access token signing key is unknown"),
        (
            lambda: tok(aud="https://elsewhere.test"),
            "The access token is not meant for this service",
        ),
    ],
    ids=["expired", "garbage", "other-key", "unknown-kid", "wrong-audience"],
)
def test_check_jwt_rejected(issuer: Issuer, token: Callable[[], str], reason: str) -> None:
    out = check(Presented(JWT, "authorization", token(), (issuer,)), None, None, TokenCache(), NOW)
    assert out.identity is None
    assert out.failed == "jwt"
    assert out.reason == reason
    assert out.unavailable is None


def test_check_jwt_valid(issuer: Issuer) -> None:
    out = check(
        Presented(JWT, "cookie", tok(scopes=["read"], roles=["ops"]), (issuer,)),
        None,
        None,
        TokenCache(),
        NOW,
    )
    assert out.failed is None and out.reason == "" and out.unavailable is None
    assert out.identity is not None
    who = out.identity
    assert (who.subject, who.issuer, who.method, who.roles, who.scopes) == (
        "alice",
        "https://as.test",
        "jwt",
        frozenset({"ops"}),
        frozenset({"read"}),
    )


@pytest.mark.parametrize(
    ("value", "identity", "failed"),
    [
        (API_KEY_VALUE, "ci", None),
        ("k-0123456789abcdeX", None, "api_key"),
        ("", None, "api_key"),
    ],
    ids=["right", "one-char-off", "empty"],
)
def test_check_api_key(value: str, identity: str | None, failed: str | None) -> None:
    out = check(Presented(API_KEY, "x-api-key", value), API_KEYS, None, TokenCache(), NOW)
    assert out.failed == failed
    if identity is None:
        assert out.identity is None
        assert (out.reason, out.detail) == ("The API key is not valid", "unknown key")
    else:
        assert out.identity == API_KEYS.verify(API_KEY_VALUE)
        assert out.identity is not None and out.identity.method == "api_key"


@pytest.mark.parametrize(
    ("value", "identity"),
    [
        (
            "alice:pw",
            Identity(
                "alice",
                "basic",
                "basic",
                frozenset({"admin"}),
                frozenset({"read"}),
                {"sub": "alice"},
            ),
        ),
        ("bob:pa:ss", Identity("bob", "basic", "basic", frozenset(), frozenset(), {"sub": "bob"})),
        (
            "test:123£",
            Identity("test", "basic", "basic", frozenset(), frozenset({"x"}), {"sub": "test"}),
        ),
    ],
    ids=["right", "password-with-colon", "utf8-password"],
)
def test_check_basic_accepted(value: str, identity: Identity) -> None:
    out = check(Presented(BASIC, "authorization", value), None, basic_users(), TokenCache(), NOW)
    assert out == type(out)(identity)


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("alice:nope", "user 'alice'"),
        ("mallory:pw", "user 'mallory'"),
        ("bob:pa", "user 'bob'"),
        ("alice:", "user 'alice'"),
        ("x" * 60 + ":pw", f"user {'x' * 40!r}"),
    ],
    ids=["wrong-password", "unknown-user", "colon-password-cut", "empty-password", "long-user"],
)
def test_check_basic_refused(value: str, detail: str) -> None:
    out = check(Presented(BASIC, "authorization", value), None, basic_users(), TokenCache(), NOW)
    assert out.identity is None
    assert (out.failed, out.reason, out.detail) == (
        "basic",
        "The user name or password is wrong",
        detail,
    )


def test_check_jwt_with_remote_keys_never_loaded(issuer: Issuer) -> None:
    remote = RemoteKeys(
        issuer="https://as.test",
        url="https://keys.as.test/jwks",
        discovery=False,
        pinned=frozenset({"RS256"}),
        clock=lambda: 500.0,
    )
    unloaded = dataclasses.replace(issuer, keys=(), remote=remote)
    out = check(Presented(JWT, "authorization", tok(), (unloaded,)), None, None, TokenCache(), NOW)
    assert out.identity is None
    assert out.failed == "jwt"
    assert out.reason == "keys unavailable"
    assert isinstance(out.unavailable, KeysUnavailable)
    assert out.unavailable.issuer == "https://as.test"
    assert out.unavailable.retry_after == 1
    assert out.detail == "no keys for https://as.test: None"
    assert remote.fetches == 0  # check() never fetches on the request path
