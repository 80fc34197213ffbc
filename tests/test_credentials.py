"""Credentials as tables: `authgate.core.credentials` (API keys, htpasswd/Basic,
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

from authgate.core.credentials import (
    API_KEY,
    BASIC,
    JWT,
    Ambiguous,
    ApiKey,
    ApiKeys,
    ApiKeyVerifier,
    BasicUser,
    BasicUsers,
    BasicVerifier,
    JwtVerifier,
    Outcome,
    Presented,
    find,
    hash_key,
    parse_htpasswd,
)
from authgate.core.identity import Identity
from authgate.core.keyset import RemoteKeys
from authgate.core.tokens import Issuer, KeysUnavailable, TokenCache
from authgate.policy.load import parse_policy
from authgate.tools.keys import jwks_for, mint, new_rsa_key

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

P = pytest.param


@pytest.mark.parametrize(
    ("key", "digest"),
    [
        P("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", id="abc"),
        P("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", id="empty"),
        P("£", hashlib.sha256(b"\xc2\xa3").hexdigest(), id="utf8"),  # "£" is c2 a3 in UTF-8
    ],
)
def test_hash_key(key: str, digest: str) -> None:
    assert hash_key(key) == digest


def test_hash_key_matches_what_verify_looks_up() -> None:
    assert bytes.fromhex(hash_key(API_KEY_VALUE)) == API_KEY_DIGEST


CI_IDENTITY = Identity(
    "ci",
    "api-key",
    "api_key",
    frozenset({"deployer"}),
    frozenset({"deploy", "read"}),
    {"sub": "ci"},
)


def test_api_key_right_key_gives_identity() -> None:
    assert API_KEYS.verify(API_KEY_VALUE) == CI_IDENTITY


@pytest.mark.parametrize(
    "presented",
    [
        P("k-0123456789abcdeX", id="last-char-differs"),
        P("K-0123456789abcdef", id="first-char-differs"),
        P("", id="empty"),
        P("k-0123456789abcde", id="truncated"),
        P(API_KEY_VALUE + " ", id="trailing-space"),
        P(API_KEY_VALUE.upper(), id="upper-case"),
        P(API_KEY_DIGEST.hex(), id="the-digest-itself"),
        P("\udcff", id="lone-surrogate"),  # an undecodable header byte must not crash
    ],
)
def test_api_key_wrong_key_is_none(presented: str) -> None:
    assert API_KEYS.verify(presented) is None


# --- parse_htpasswd -----------------------------------------------------------------------


H = HASH_PW.decode()
H2 = HASH_COLON.decode()
ONLY_BCRYPT = "hash; only bcrypt is accepted (htpasswd -B)"


def fix(user: str) -> str:
    return f": set the password again with `htpasswd -B -C 10 FILE {user}`"


@pytest.mark.parametrize(
    ("text", "users"),
    [
        P(f"alice:{H}\n", {"alice": H}, id="bcrypt-2b"),
        P(f"alice:$2y${H[4:]}\n", {"alice": f"$2y${H[4:]}"}, id="bcrypt-2y"),
        P(f"alice:$2a${H[4:]}\n", {"alice": f"$2a${H[4:]}"}, id="bcrypt-2a"),
        P(f"alice:{H}", {"alice": H}, id="no-final-newline"),
        P(f"alice:{H}\r\nbob:{H2}\r\n", {"alice": H, "bob": H2}, id="crlf"),
        P(
            f"# users\n\n   \nalice:{H}\n  # indented comment\n\t\nbob:{H2}\n",
            {"alice": H, "bob": H2},
            id="comments-and-blank-lines",
        ),
        P(f"  alice:{H}  \n", {"alice": H}, id="surrounding-spaces"),
        P("", {}, id="empty-file"),
        P("# only a comment\n", {}, id="only-comments"),
        P(f"alice:$2b$08${H[7:]}\n", {"alice": f"$2b$08${H[7:]}"}, id="cost-08"),
        P(f"alice:$2y$05${H[7:]}\n", {"alice": f"$2y$05${H[7:]}"}, id="htpasswd-B-default-05"),
        P(f"alice:{HASH_LOW_COST.decode()}\n", {"alice": HASH_LOW_COST.decode()}, id="cost-04"),
        P(f"alice:$2b$12${H[7:]}\n", {"alice": f"$2b$12${H[7:]}"}, id="cost-12"),
    ],
)
def test_parse_htpasswd_accepts(text: str, users: dict[str, str]) -> None:
    parsed, problem = parse_htpasswd(text)
    assert problem is None
    assert parsed == {u: h.encode() for u, h in users.items()}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        P(
            "alice:$apr1$JxSX5TkP$fJOXOsAvW.0x4jr0U8V7a0\n",
            (1, f"user 'alice' has an apr1/MD5 {ONLY_BCRYPT}{fix('alice')}"),
            id="apr1",
        ),
        P(
            "alice:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n",
            (1, f"user 'alice' has a SHA-1 {ONLY_BCRYPT}{fix('alice')}"),
            id="sha1",
        ),
        P(
            "alice:rqXexS6ZhobKA\n",
            (1, f"user 'alice' has a crypt/plain-text {ONLY_BCRYPT}{fix('alice')}"),
            id="crypt",
        ),
        P(
            "alice:secret\n",
            (1, f"user 'alice' has a crypt/plain-text {ONLY_BCRYPT}{fix('alice')}"),
            id="plain-text",
        ),
        P(
            "alice:\n",
            (1, f"user 'alice' has a crypt/plain-text {ONLY_BCRYPT}{fix('alice')}"),
            id="empty-hash",
        ),
        P(
            f"alice:$2x${H[4:]}\n",
            (1, f"user 'alice' has a crypt/plain-text {ONLY_BCRYPT}{fix('alice')}"),
            id="bcrypt-2x-prefix",
        ),
        P("alice\n", (1, "expected user:hash"), id="missing-colon"),
        P(f":{H}\n", (1, "expected user:hash"), id="empty-user"),
        P(f"alice:{H}\nalice:{H2}\n", (2, "user 'alice' appears twice"), id="duplicate-user"),
        P(
            f"alice:$2b$03${H[7:]}\n",
            (1, "user 'alice': bcrypt cost 03 is not valid (>= 4)"),
            id="cost-03",
        ),
        P(
            f"# comment\n\nalice:{H}\nbob:secret\n",
            (4, f"user 'bob' has a crypt/plain-text {ONLY_BCRYPT}{fix('bob')}"),
            id="line-number-counts-comments-and-blanks",
        ),
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
        P("alice", "pw", True, id="right-password"),
        P("bob", "pa:ss", True, id="password-with-colon"),
        P("test", "123£", True, id="utf8-password"),
        P("yves", "pw", True, id="hash-2y"),
        P("ada", "pw", True, id="hash-2a"),
        P("alice", "PW", False, id="wrong-case"),
        P("alice", "pw ", False, id="trailing-space"),
        P("alice", "", False, id="empty-password"),
        P("bob", "pa", False, id="colon-password-cut-short"),
        P("test", "123", False, id="utf8-password-cut-short"),
        P("test", "123\xa3", True, id="utf8-password-as-str"),  # same text as "123£"
        P("mallory", "pw", False, id="unknown-user"),
        P("", "pw", False, id="empty-user"),
        P("Alice", "pw", False, id="user-name-is-case-sensitive"),
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

BEARER = ("authorization", "Bearer tok")
BASIC_ALICE = ("authorization", f"Basic {b64('alice:pw')}")
API_KEY_HEADER = ("x-api-key", API_KEY_VALUE)
NOT_UTF8 = b64(b"alice:\xa3")  # latin-1 "£": not UTF-8

Expected = tuple[str, str, str, tuple[str, ...]] | None  # kind, via, value, issuer names


def found(
    id: str,
    headers: list[tuple[str, str]],
    expected: Expected,
    *,
    query: str = "",
    on: str = "plain",
    basic: bool = True,
    keys: bool = True,
    malformed: bool = False,
) -> Any:
    """A find() case: `on` names the issuer set the rule accepts (see `issuers`)."""
    return pytest.param(on, basic, keys, headers, query, expected, malformed, id=id)


def auth(value: str) -> tuple[str, str]:
    return ("authorization", value)


def jwt_via(via: str, value: str, *names: str) -> Expected:
    return (JWT, via, value, names)


ALICE_BASIC = (BASIC, "authorization", "alice:pw", ())
KEY_FOUND = (API_KEY, "x-api-key", API_KEY_VALUE, ())

FOUND = [
    # Bearer: the scheme is case-insensitive, then 1*SP (H-04)
    found("bearer", [BEARER], jwt_via("authorization", "tok", "t")),
    found("bearer-lower-case", [auth("bearer tok")], jwt_via("authorization", "tok", "t")),
    found("bearer-upper-case", [auth("BEARER tok")], jwt_via("authorization", "tok", "t")),
    found("bearer-mixed-case", [auth("bEaReR tok")], jwt_via("authorization", "tok", "t")),
    found("bearer-two-spaces", [auth("Bearer  tok")], jwt_via("authorization", "tok", "t")),
    found("bearer-outer-spaces", [auth("  Bearer tok  ")], jwt_via("authorization", "tok", "t")),
    found("bearer-token68-padding", [auth("Bearer ab==")], jwt_via("authorization", "ab==", "t")),
    found("bearer-without-token", [auth("Bearer")], jwt_via("authorization", "", "t")),
    found("bearer-all-issuers", [BEARER], jwt_via("authorization", "tok", "qc", "other"), on="two"),
    found("bearer-rule-takes-no-jwt", [BEARER], None, on="none"),
    # Basic (BA-02, BA-03)
    found("basic", [BASIC_ALICE], ALICE_BASIC),
    found("basic-lower-case", [auth(f"basic {b64('alice:pw')}")], ALICE_BASIC),
    found(
        "basic-password-with-colon",
        [auth("Basic YWxpY2U6cGE6c3M=")],
        (BASIC, "authorization", "alice:pa:ss", ()),
    ),
    found(
        "basic-utf8", [auth("Basic dGVzdDoxMjPCow==")], (BASIC, "authorization", "test:123£", ())
    ),
    found(
        "basic-empty-password",
        [auth(f"Basic {b64('alice:')}")],
        (BASIC, "authorization", "alice:", ()),
    ),
    found("basic-no-colon", [auth("Basic Zm9v")], None, malformed=True),
    found("basic-not-base64", [auth("Basic !!!")], None, malformed=True),
    found("basic-nul", [auth(f"Basic {b64('a' + chr(0) + ':b')}")], None, malformed=True),
    found("basic-newline", [auth(f"Basic {b64('a:b' + chr(10))}")], None, malformed=True),
    found("basic-del", [auth(f"Basic {b64('a:b' + chr(127))}")], None, malformed=True),
    found("basic-not-utf8", [auth(f"Basic {NOT_UTF8}")], None, malformed=True),
    found("basic-empty", [auth("Basic")], None, malformed=True),
    found("basic-rule-takes-no-basic", [BASIC_ALICE], None, basic=False),
    # Unsupported schemes count as no credentials
    found("digest", [auth('Digest username="alice"')], None),
    found("negotiate", [auth("Negotiate YII=")], None),
    found("empty-authorization", [auth("")], None),
    # API keys
    found("api-key", [API_KEY_HEADER], KEY_FOUND),
    found("api-key-padded", [("x-api-key", f"  {API_KEY_VALUE} ")], KEY_FOUND),
    found("api-key-rule-takes-no-keys", [API_KEY_HEADER], None, keys=False),
    found("api-key-beside-digest", [auth("Digest x"), API_KEY_HEADER], KEY_FOUND),
    # Query tokens only where an issuer configured the parameter (B-08)
    found("query", [], jwt_via("query", "tok", "q"), query="access_token=tok", on="query"),
    found(
        "query-among-others",
        [],
        jwt_via("query", "tok", "q"),
        query="a=1&access_token=tok&b=2",
        on="query",
    ),
    found(
        "query-percent-encoded-name",
        [],
        jwt_via("query", "tok", "q"),
        query="access%5Ftoken=tok",
        on="query",
    ),
    found("query-not-configured", [], None, query="access_token=tok"),
    found("query-other-name", [], None, query="token=tok", on="query"),
    found("query-its-issuer-only", [], jwt_via("query", "t", "other"), query="token=t", on="two"),
    found("query-rule-takes-no-jwt", [], None, query="access_token=tok", on="none"),
    # Cookies: only when nothing else is sent, only where configured
    found("cookie", [("cookie", "at=tok")], jwt_via("cookie", "tok", "c"), on="cookie"),
    found(
        "cookie-among-others",
        [("cookie", "theme=dark; at=tok; x=1")],
        jwt_via("cookie", "tok", "c"),
        on="cookie",
    ),
    found(
        "cookie-in-second-field",
        [("cookie", "theme=dark"), ("cookie", "at=tok")],
        jwt_via("cookie", "tok", "c"),
        on="cookie",
    ),
    found(
        "cookie-its-issuer-only",
        [("cookie", "sid=tok")],
        jwt_via("cookie", "tok", "other"),
        on="two",
    ),
    found(
        "cookie-other-repeated",
        [("cookie", "x=1"), ("cookie", "x=2; at=tok")],
        jwt_via("cookie", "tok", "c"),
        on="cookie",
    ),
    found("cookie-not-configured", [("cookie", "at=tok")], None),
    found("cookie-other-name", [("cookie", "session=tok")], None, on="cookie"),
    found("cookie-rule-takes-no-jwt", [("cookie", "at=tok")], None, on="none"),
    # Browsers store and send cookie values with spaces, quotes or braces; an
    # unrelated cookie like that must not hide the token cookie.
    found(
        "cookie-beside-cookie-with-space",
        [("cookie", "at=tok; prefs=a b")],
        jwt_via("cookie", "tok", "c"),
        on="cookie",
    ),
    found(
        "cookie-beside-json-cookie",
        [("cookie", 'consent={"ads":false}; at=tok')],
        jwt_via("cookie", "tok", "c"),
        on="cookie",
    ),
    # ...and an explicit credential beside the cookie wins
    found(
        "cookie-and-bearer",
        [("cookie", "at=ck"), BEARER],
        jwt_via("authorization", "tok", "c"),
        on="cookie",
    ),
    found("cookie-and-api-key", [("cookie", "at=ck"), API_KEY_HEADER], KEY_FOUND, on="cookie"),
    found("cookie-and-basic", [("cookie", "at=ck"), BASIC_ALICE], ALICE_BASIC, on="cookie"),
    found(
        "cookie-and-query",
        [("cookie", "at=ck")],
        jwt_via("query", "tok", "qc"),
        query="access_token=tok",
        on="both",
    ),
    found(
        "cookie-and-malformed-basic",
        [("cookie", "at=ck"), auth("Basic Zm9v")],
        None,
        on="cookie",
        malformed=True,
    ),
    found("nothing", [("accept", "*/*")], None, query="a=1", on="two"),
]


@pytest.mark.parametrize(
    ("on", "basic", "keys", "headers", "query", "expected", "malformed"), FOUND
)
def test_find(
    issuers: dict[str, tuple[Issuer, ...]],
    on: str,
    basic: bool,
    keys: bool,
    headers: list[tuple[str, str]],
    query: str,
    expected: Expected,
    malformed: bool,
) -> None:
    presented, bad = find(
        issuers[on],
        API_KEYS if keys else None,
        basic_users() if basic else None,
        headers,
        query,
    )
    if expected is None:
        assert presented is None
    else:
        assert presented is not None
        got = (presented.kind, presented.via, presented.value, presented.issuers)
        assert got[:3] == expected[:3]
        assert tuple(i.name for i in got[3]) == expected[3]
    assert bad == (Presented(BASIC, "authorization", "") if malformed else None)


def ambiguous(
    id: str, headers: list[tuple[str, str]], message: str, *, query: str = "", on: str = "plain"
) -> Any:
    return pytest.param(on, headers, query, message, id=id)


AMBIGUOUS = [
    # H-07, B-05: 400 invalid_request
    ambiguous(
        "two-authorization-fields",
        [auth("Bearer a"), auth("Bearer b")],
        "more than one Authorization field",
    ),
    ambiguous(
        "two-authorization-fields-two-schemes",
        [BASIC_ALICE, BEARER],
        "more than one Authorization field",
    ),
    ambiguous(
        "two-authorization-fields-unsupported",
        [auth("Digest a"), auth("Digest b")],
        "more than one Authorization field",
        on="none",
    ),
    ambiguous(
        "api-key-twice", [("x-api-key", "a"), ("x-api-key", "b")], "more than one x-api-key field"
    ),
    ambiguous(
        "api-key-twice-same-value",
        [API_KEY_HEADER, API_KEY_HEADER],
        "more than one x-api-key field",
    ),
    ambiguous(
        "bearer-and-api-key", [BEARER, API_KEY_HEADER], "credentials sent in more than one way"
    ),
    ambiguous(
        "basic-and-api-key", [BASIC_ALICE, API_KEY_HEADER], "credentials sent in more than one way"
    ),
    ambiguous(
        "malformed-basic-and-api-key",
        [auth("Basic Zm9v"), API_KEY_HEADER],
        "credentials sent in more than one way",
    ),
    ambiguous(
        "bearer-and-query",
        [BEARER],
        "credentials sent in more than one way",
        query="access_token=tok2",
        on="query",
    ),
    ambiguous(
        "basic-and-query",
        [BASIC_ALICE],
        "credentials sent in more than one way",
        query="access_token=tok",
        on="query",
    ),
    ambiguous(
        "api-key-and-query",
        [API_KEY_HEADER],
        "credentials sent in more than one way",
        query="access_token=tok",
        on="query",
    ),
    ambiguous(
        "query-twice",
        [],
        "more than one access_token query parameter",
        query="access_token=a&access_token=b",
        on="query",
    ),
    ambiguous(
        "query-twice-one-empty",
        [],
        "more than one access_token query parameter",
        query="access_token=&access_token=b",
        on="query",
    ),
    ambiguous(
        "query-for-two-issuers",
        [],
        "credentials sent in more than one way",
        query="access_token=a&token=b",
        on="two",
    ),
    ambiguous(
        "cookie-twice-two-fields",
        [("cookie", "at=a"), ("cookie", "at=b")],
        "more than one at cookie",
        on="cookie",
    ),
    # One Cookie field is how HTTP/1.1 browsers send every cookie: the same
    # name twice there (two paths or domains) is as ambiguous as in two fields.
    ambiguous(
        "cookie-twice-one-field", [("cookie", "at=a; at=b")], "more than one at cookie", on="cookie"
    ),
    # Query tokens for two issuers are ambiguous (above); cookies for two
    # issuers must not be settled by set iteration order (the hash seed).
    ambiguous("cookie-for-two-issuers", [("cookie", "at=a; sid=b")], "more than one", on="two"),
]


@pytest.mark.parametrize(("on", "headers", "query", "message"), AMBIGUOUS)
def test_find_ambiguous(
    issuers: dict[str, tuple[Issuer, ...]],
    on: str,
    headers: list[tuple[str, str]],
    query: str,
    message: str,
) -> None:
    with pytest.raises(Ambiguous) as caught:
        find(issuers[on], API_KEYS, basic_users(), headers, query)
    assert str(caught.value).startswith(message)


# --- verifiers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer(issuers: dict[str, tuple[Issuer, ...]]) -> Issuer:
    return issuers["plain"][0]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        P(lambda: tok(ttl=-10), "The access token expired", id="expired"),
        P(lambda: "not a token", "The access token is malformed", id="garbage"),
        P(lambda: tok(key=OTHER_KEY), "The access token signature is invalid", id="other-key"),
        P(lambda: tok(kid="k9"), "The access token signing key is unknown", id="unknown-kid"),
        P(
            lambda: tok(aud="https://elsewhere.test"),
            "The access token is not meant for this service",
            id="wrong-audience",
        ),
    ],
)
def test_check_jwt_rejected(issuer: Issuer, token: Callable[[], str], reason: str) -> None:
    out = JwtVerifier(TokenCache()).check(Presented(JWT, "authorization", token(), (issuer,)), NOW)
    assert out.identity is None
    assert out.failed == "jwt"
    assert out.reason == reason
    assert out.unavailable is None


def test_check_jwt_valid(issuer: Issuer) -> None:
    out = JwtVerifier(TokenCache()).check(
        Presented(JWT, "cookie", tok(scopes=["read"], roles=["ops"]), (issuer,)), NOW
    )
    assert (out.failed, out.reason, out.unavailable) == (None, "", None)
    assert out.identity is not None
    who = out.identity
    assert (who.subject, who.issuer, who.method, who.roles, who.scopes) == (
        "alice",
        "https://as.test",
        "jwt",
        frozenset({"ops"}),
        frozenset({"read"}),
    )


def test_check_api_key_right() -> None:
    out = ApiKeyVerifier(API_KEYS).check(Presented(API_KEY, "x-api-key", API_KEY_VALUE), NOW)
    assert out == Outcome(CI_IDENTITY)


@pytest.mark.parametrize(
    "value",
    [
        P("k-0123456789abcdeX", id="one-char-off"),
        P("", id="empty"),
        P(API_KEY_DIGEST.hex(), id="the-digest-itself"),
    ],
)
def test_check_api_key_wrong(value: str) -> None:
    out = ApiKeyVerifier(API_KEYS).check(Presented(API_KEY, "x-api-key", value), NOW)
    assert out == Outcome(
        failed="api_key",
        reason="The API key is not valid",
        code="unknown_api_key",
        detail="unknown key",
    )


def basic_identity(user: str, roles: set[str], scopes: set[str]) -> Identity:
    return Identity(user, "basic", "basic", frozenset(roles), frozenset(scopes), {"sub": user})


@pytest.mark.parametrize(
    ("value", "identity"),
    [
        P("alice:pw", basic_identity("alice", {"admin"}, {"read"}), id="right"),
        P("bob:pa:ss", basic_identity("bob", set(), set()), id="password-with-colon"),
        P("test:123£", basic_identity("test", set(), {"x"}), id="utf8-password"),
    ],
)
def test_check_basic_accepted(value: str, identity: Identity) -> None:
    out = BasicVerifier(basic_users()).check(Presented(BASIC, "authorization", value), NOW)
    assert out == Outcome(identity)


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        P("alice:nope", "user 'alice'", id="wrong-password"),
        P("mallory:pw", "user 'mallory'", id="unknown-user"),
        P("bob:pa", "user 'bob'", id="colon-password-cut-short"),
        P("alice:", "user 'alice'", id="empty-password"),
        P("x" * 60 + ":pw", f"user {'x' * 40!r}", id="long-user-cut-in-detail"),
    ],
)
def test_check_basic_refused(value: str, detail: str) -> None:
    out = BasicVerifier(basic_users()).check(Presented(BASIC, "authorization", value), NOW)
    assert out == Outcome(
        failed="basic",
        reason="The user name or password is wrong",
        code="wrong_password",
        detail=detail,
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
    out = JwtVerifier(TokenCache()).check(Presented(JWT, "authorization", tok(), (unloaded,)), NOW)
    assert out.identity is None
    assert (out.failed, out.reason, out.code) == ("jwt", "keys unavailable", "keys_unavailable")
    assert out.detail == "no keys for https://as.test: None"
    assert isinstance(out.unavailable, KeysUnavailable)
    assert (out.unavailable.issuer, out.unavailable.retry_after) == ("https://as.test", 1)
    assert remote.fetches == 0  # a check never fetches on the request path


def test_a_password_longer_than_bcrypt_reads_is_compared_on_its_first_72_bytes() -> None:
    """bcrypt 5 raises on more than 72 bytes; htpasswd hashes the first 72."""
    long = "x" * 80
    users = BasicUsers(
        {
            "u": BasicUser(
                "u", bcrypt.hashpw(long.encode()[:72], bcrypt.gensalt(4)), frozenset(), frozenset()
            )
        }
    )
    assert users.check("u", long, 0.0) is True
    assert users.check("u", "y" * 80, 0.0) is False
