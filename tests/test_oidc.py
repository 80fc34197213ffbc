"""The OpenID Connect login's pure parts (`authgate.core.oidc`) and its
policy section (`authn.oidc`), as tables: where a browser may be sent back
to, the callback's checks, the ID token's, sessions and their lifetimes,
refreshes, the logout's cross-site check. The login through a real gateway
and a real provider: tests/test_login.py."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import jwt
import pytest

from authgate.core import oidc
from authgate.core.credentials import OIDC, Ambiguous, find
from authgate.core.decision import RequestView, judge
from authgate.core.keyset import VerifyKey
from authgate.core.model import Policy, credentials_in_clear
from authgate.core.oidc import (
    CodeExchange,
    Login,
    LoginRejected,
    ProviderMetadata,
    Session,
    TokenResponse,
    safe_return,
)
from authgate.core.sealing import Sealer
from authgate.core.tokens import KeysUnavailable
from authgate.policy.load import parse_policy
from authgate.policy.marks import PolicyError
from authgate.runtime.stores import MemoryStore
from authgate.tools import keys

ISS = "https://id.example"
KEY = keys.new_rsa_key()
STRANGER = keys.new_rsa_key()
SESSION_KEY = bytes(range(32))
NOW = 1_800_000_000.0
META = {
    "issuer": ISS,
    "authorization_endpoint": f"{ISS}/auth",
    "token_endpoint": f"{ISS}/token",
    "jwks_uri": f"{ISS}/jwks",
    "userinfo_endpoint": f"{ISS}/me",
    "end_session_endpoint": f"{ISS}/session/end",
    "authorization_response_iss_parameter_supported": True,
    "code_challenge_methods_supported": ["S256"],
}

POLICY = """\
version: 1
authn:
  oidc:
    issuer: https://id.example
    client_id: app
    client_secret_file: secret.txt
    redirect_uri: https://app.example/oauth2/callback
    scopes: [openid, email]
    roles_claim: groups
    session:
      keys_file: session.keys
      idle: 10m
      absolute: 1h
rules:
  - name: app
    match: {path: "/app/**"}
    allow: authenticated
  - name: admin
    match: {path: "/admin/**"}
    allow: {role: admin}
"""


def write(tmp_path: Path, text: str = POLICY) -> Path:
    (tmp_path / "secret.txt").write_text("s3cret-s3cret\n")
    (tmp_path / "session.keys").write_text(base64.b64encode(SESSION_KEY).decode() + "\n")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def policy_at(tmp_path: Path, text: str = POLICY, *, loaded: bool = True) -> Policy:
    path = write(tmp_path, text)
    policy = parse_policy(path.read_text(), str(path), tmp_path)
    assert policy.login is not None
    remote = policy.login.issuer.remote
    assert remote is not None
    if loaded:
        # What a fetch of the provider's discovery document and keys gives.
        metadata = remote.parse_metadata(META) if remote.parse_metadata else None
        remote.apply((VerifyKey("k1", KEY.public_key(), frozenset({"RS256"})),), 300, metadata)
    return policy


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return policy_at(tmp_path)


@pytest.fixture
def login(policy: Policy) -> Login:
    assert policy.login is not None
    return policy.login


def id_token(key: Any = KEY, kid: str = "k1", alg: str = "RS256", **claims: Any) -> str:
    body: dict[str, Any] = {
        "iss": ISS, "sub": "alice", "aud": "app", "iat": NOW, "exp": NOW + 600,
        "nonce": "n-1", "email": "alice@example.com", "groups": ["admin"],
    }  # fmt: skip
    body.update(claims)
    for name in [k for k, v in body.items() if v is None]:
        del body[name]
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


# --- the policy section ---------------------------------------------------------------------


def test_the_section_compiles(login: Login, policy: Policy) -> None:
    assert (login.client_id, login.client_secret, login.client_auth) == (
        "app", "s3cret-s3cret", "client_secret_basic")  # fmt: skip
    assert (login.callback_path, login.start_path, login.logout_path) == (
        "/oauth2/callback", "/oauth2/start", "/oauth2/logout")  # fmt: skip
    assert login.origin == "https://app.example" and login.post_logout == "https://app.example/"
    assert login.secure and login.session_cookie == "__Host-authgate_session"
    assert login.pending_prefix == "__Secure-authgate_session-login-"
    assert (login.idle, login.absolute, login.scopes) == (600, 3600, ("openid", "email"))
    assert login.issuer.audience == ("app",) and login.issuer.remote is not None
    # Rules accepting sessions send page loads to the login; the secret and key
    # files are watched (a rotation reloads).
    assert policy.rule_index["app"].login_url == "/oauth2/start"
    assert policy.rule_index["app"].accept == frozenset({OIDC})
    assert {Path(f).name for f in policy.files} >= {"secret.txt", "session.keys"}
    assert "s3cret" not in repr(login)


def test_plain_http_on_loopback_gets_unprefixed_cookies(tmp_path: Path) -> None:
    text = POLICY.replace("https://app.example", "http://127.0.0.1:8080").replace(
        "https://id.example", "http://127.0.0.1:9000")  # fmt: skip
    login = policy_at(tmp_path, text, loaded=False).login
    assert login is not None and not login.secure
    assert (login.session_cookie, login.pending_prefix) == (
        "authgate_session", "authgate_session-login-")  # fmt: skip


def test_secrets_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OIDC_SECRET", "from-env")
    monkeypatch.setenv("SESSION_KEYS", f"{bytes(32).hex()},{SESSION_KEY.hex()}")
    text = POLICY.replace("client_secret_file: secret.txt", "client_secret_env: OIDC_SECRET")
    text = text.replace("keys_file: session.keys", "keys_env: SESSION_KEYS")
    login = policy_at(tmp_path, text, loaded=False).login
    assert login is not None and login.client_secret == "from-env"
    assert login.sealer is not None and login.sealer.count == 2


@pytest.mark.parametrize(
    "change, line, message",
    [
        (("    client_id: app\n", ""), 4, "authn.oidc needs 'client_id'"),
        (("issuer: https://id.example", "issuer: http://id.example"), 4, "plain http"),
        (("client_secret_file: secret.txt", "client_secret_env: NOT_SET_ANYWHERE"), 6,
         "environment variable NOT_SET_ANYWHERE (client secret) is not set"),
        (("client_secret_file: secret.txt", "client_secret_file: missing.txt"), 6,
         "cannot read client secret"),
        (("    client_secret_file: secret.txt\n", ""), 4,
         "needs exactly one of client_secret_file, client_secret_env"),
        (("redirect_uri: https://app.example/oauth2/callback",
          "redirect_uri: /oauth2/callback"), 7, "redirect_uri"),
        (("redirect_uri: https://app.example/oauth2/callback",
          "redirect_uri: https://app.example/cb?x=1"), 7, "without query"),
        (("scopes: [openid, email]", "scopes: [email]"), 8, "scopes must include openid"),
        (("scopes: [openid, email]", 'scopes: [openid, "a b"]'), 8, "not a valid scope token"),
        (("    roles_claim: groups\n", "    roles_claim: groups\n    client_auth: jwt\n"), 10,
         "client_auth must be client_secret_basic or client_secret_post"),
        (("    roles_claim: groups\n", "    algorithms: [HS256]\n"), 9, "not a public-key"),
        (("    roles_claim: groups\n", "    start_path: /oauth2/callback\n"), 4, "must differ"),
        (("    roles_claim: groups\n", "    logout_path: //evil\n"), 9, "logout_path"),
        (("    roles_claim: groups\n", "    post_logout_redirect: https://evil.example/\n"), 9,
         "post_logout_redirect must be a path on https://app.example"),
        (("    roles_claim: groups\n", "    secret: x\n"), 9, "unknown key 'secret'"),
        (("keys_file: session.keys", "keys_file: secret.txt"), 11,
         "session keys: key 1 is not 32 bytes"),
        (("      idle: 10m\n", "      idle: 2h\n"), 12, "at most absolute"),
        (("    session:\n", "    session:\n      cookie: __Host-x\n"), 11, "session.cookie"),
        (("    allow: authenticated\n", "    allow: authenticated\n    accept: [oidc, basic]\n"),
         18, "accept: 'basic' is not configured"),
    ],
)  # fmt: skip
def test_policy_errors(tmp_path: Path, change: tuple[str, str], line: int, message: str) -> None:
    text = POLICY.replace(*change)
    assert text != POLICY
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        parse_policy(text, str(path), tmp_path)
    assert (info.value.line, info.value.file) == (line, str(path)), info.value
    assert message in info.value.message


def test_oidc_is_accepted_only_where_configured(tmp_path: Path) -> None:
    text = (
        "version: 1\nrules:\n"
        "  - {name: a, match: {path: /a}, allow: authenticated, accept: [oidc]}\n"
    )
    with pytest.raises(PolicyError, match="p.yaml:3: accept: 'oidc' is not configured"):
        parse_policy(text, str(tmp_path / "p.yaml"), tmp_path)


# --- where to go back to ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "asked, kept",
    [
        ("/app/orders", "/app/orders"),
        ("/app/orders?page=2&sort=date", "/app/orders?page=2&sort=date"),
        ("/app/%7Ebob/./x", "/app/~bob/x"),  # canonical
        ("/", "/"),
        ("/app/?next=https://evil.example", "/app/?next=https://evil.example"),  # a query
        # elsewhere, or read as elsewhere by some browser
        ("https://evil.example/", None),
        ("http:evil.example", None),
        ("//evil.example/x", None),
        ("///evil.example", None),
        ("/\\evil.example", None),
        ("\\/evil.example", None),
        ("/app\\..\\..\\evil", None),
        ("/%2F%2Fevil.example", None),
        ("/%5Cevil.example", None),
        ("javascript:alert(1)", None),
        ("data:text/html,x", None),
        (" /app", None),
        ("/app\t/x", None),
        ("/app\r\nSet-Cookie: x=1", None),
        ("/app#frag", None),
        ("/..", None),
        ("", None),
        (None, None),
        ("/" + "a" * 3000, None),
        # the login's own endpoints: no loop
        ("/oauth2/start?next=/x", None),
        ("/oauth2/callback", None),
        ("/oauth2/./start", None),
    ],
)
def test_safe_return(login: Login, asked: str | None, kept: str | None) -> None:
    assert safe_return(asked, login) == kept


# --- START ------------------------------------------------------------------------------------


def test_start_builds_the_authorization_request(login: Login) -> None:
    answer = oidc.start(login, urlencode({"next": "/app/orders?page=2"}), NOW)
    assert (answer.status, answer.reason) == (303, oidc.LOGIN_START)
    assert answer.location is not None
    url = urlsplit(answer.location)
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{ISS}/auth"
    q = dict(parse_qsl(url.query))
    assert q["response_type"] == "code" and q["client_id"] == "app"
    assert q["redirect_uri"] == "https://app.example/oauth2/callback"
    assert q["scope"] == "openid email" and q["code_challenge_method"] == "S256"
    (cookie,) = answer.cookies
    name, _, rest = cookie.partition("=")
    assert name == login.pending_prefix + q["state"][:16]
    value, _, attributes = rest.partition("; ")
    assert attributes == "Path=/oauth2/callback; Max-Age=600; HttpOnly; Secure; SameSite=Lax"
    # The pre-login cookie holds what the callback checks, sealed for this purpose.
    assert login.sealer is not None
    assert login.sealer.open(value, b"session|authgate_session|app") is None
    pending = oidc.Pending.loads(login.sealer.open(value, b"login|authgate_session|app") or b"")
    assert (pending.state, pending.nonce, pending.next, pending.started) == (
        q["state"], q["nonce"], "/app/orders?page=2", NOW)  # fmt: skip
    challenge = base64.urlsafe_b64encode(hashlib.sha256(pending.verifier.encode()).digest())
    assert q["code_challenge"] == challenge.rstrip(b"=").decode()
    # Fresh values each time.
    again = dict(parse_qsl(urlsplit(oidc.start(login, "", NOW).location or "").query))
    assert again["state"] != q["state"] and again["nonce"] != q["nonce"]


@pytest.mark.parametrize(
    "query, back",
    [
        ("next=%2Fapp", "/app"),
        ("rd=%2Fapp", "/app"),
        ("", "/"),
        ("next=https%3A%2F%2Fevil.example", "/"),
        ("rd=%2F%2Fevil.example", "/"),
        ("next=%2F%5Cevil.example", "/"),
    ],
)
def test_start_returns_only_to_this_origin(login: Login, query: str, back: str) -> None:
    answer = oidc.start(login, query, NOW)
    assert login.sealer is not None
    value = answer.cookies[0].split("=", 1)[1].split(";")[0]
    opened = login.sealer.open(value, b"login|authgate_session|app")
    assert opened is not None and oidc.Pending.loads(opened).next == back


def test_start_without_the_providers_metadata_is_503(tmp_path: Path) -> None:
    login = policy_at(tmp_path, loaded=False).login
    assert login is not None
    answer = oidc.start(login, "", NOW)
    assert (answer.status, answer.reason) == (503, oidc.PROVIDER_UNAVAILABLE)
    assert dict(answer.headers)["Retry-After"].isdigit() and answer.location is None


# --- CALLBACK ---------------------------------------------------------------------------------


def begun(login: Login, query: str = "next=%2Fapp") -> tuple[str, str, oidc.Pending]:
    """A START: (state, the Cookie field the browser sends back, what it holds)."""
    answer = oidc.start(login, query, NOW)
    state = dict(parse_qsl(urlsplit(answer.location or "").query))["state"]
    pair = answer.cookies[0].split(";")[0]
    assert login.sealer is not None
    opened = login.sealer.open(pair.split("=", 1)[1], b"login|authgate_session|app")
    return state, pair, oidc.Pending.loads(opened or b"")


def test_a_callback_that_belongs_to_the_login(login: Login) -> None:
    state, cookie, pending = begun(login)
    query = urlencode({"code": "c1", "state": state, "iss": ISS})
    work = oidc.callback(login, query, [cookie], NOW)
    assert isinstance(work, CodeExchange)
    assert (work.code, work.pending, work.iss_sent) == ("c1", pending, True)
    name = cookie.split("=")[0]
    removal = f"{name}=; Path=/oauth2/callback; Max-Age=0; HttpOnly; Secure; SameSite=Lax"
    assert work.clears == (removal,)


@pytest.mark.parametrize(
    "params, cookie, later, why",
    [
        ({"code": "c1"}, "own", 0, "no state"),
        ({"code": "c1", "state": "short"}, "own", 0, "no state"),
        ({"code": "c1", "state": "OTHER"}, "own", 0, "no login in progress"),  # another login's
        ({"code": "c1", "state": "OWN"}, None, 0, "no login in progress"),  # another browser
        ({"code": "c1", "state": "OWN"}, "twice", 0, "more than one"),
        ({"code": "c1", "state": "OWN"}, "tampered", 0, "does not open"),
        ({"code": "c1", "state": "OWN"}, "swapped", 0, "does not match"),
        ({"code": "c1", "state": "OWN"}, "own", 601, "expired"),
        ({"error": "access_denied", "state": "OWN"}, "own", 0, "the provider answered"),
        ({"code": "c1", "state": "OWN", "iss": "https://evil.example"}, "own", 0, "iss"),
        ({"code": "c1", "state": "OWN", "iss": ISS + "/"}, "own", 0, "iss"),
        ({"state": "OWN", "iss": ISS}, "own", 0, "no code"),
        ({"code": "", "state": "OWN"}, "own", 0, "no code"),
    ],
)
def test_callbacks_that_do_not(
    login: Login, params: dict[str, str], cookie: str | None, later: int, why: str
) -> None:
    state, own, _ = begun(login)
    other_state, other, _ = begun(login)
    params = {k: {"OWN": state, "OTHER": other_state[:10] + state[10:]}.get(v, v)
              for k, v in params.items()}  # fmt: skip
    name, value = own.split("=", 1)
    fields = {
        "own": [own],
        None: [],
        "twice": [own, own],
        "tampered": [f"{name}={value[:-3]}AAA"],
        # the other login's sealed value under this state's name
        "swapped": [f"{name}={other.split('=', 1)[1]}"],
    }[cookie]
    answer = oidc.callback(login, urlencode(params), fields, NOW + later)
    assert isinstance(answer, oidc.Answer)
    assert (answer.status, answer.reason) == (400, oidc.LOGIN_FAILED)
    assert why in answer.detail


def test_a_parameter_twice_is_refused(login: Login) -> None:
    state, cookie, _ = begun(login)
    query = f"code=a&code=b&state={state}"
    answer = oidc.callback(login, query, [cookie], NOW)
    assert isinstance(answer, oidc.Answer) and "twice" in answer.detail


def test_iss_missing_when_the_provider_always_sends_it(login: Login) -> None:
    state, cookie, _ = begun(login)
    work = oidc.callback(login, urlencode({"code": "c", "state": state}), [cookie], NOW)
    assert isinstance(work, CodeExchange) and login.metadata is not None
    assert isinstance(oidc.code_request(work, login.metadata), str)
    quiet = dataclasses.replace(login.metadata, iss_parameter=False)
    request = oidc.code_request(work, quiet)
    assert isinstance(request, oidc.HttpRequest)
    assert request.url == f"{ISS}/token"
    form = dict(parse_qsl((request.body or b"").decode()))
    assert form == {
        "grant_type": "authorization_code", "code": "c",
        "redirect_uri": "https://app.example/oauth2/callback",
        "code_verifier": work.pending.verifier,
    }  # fmt: skip
    assert dict(request.headers)["Authorization"] == "Basic " + base64.b64encode(
        b"app:s3cret-s3cret").decode()  # fmt: skip


def test_client_secret_post(tmp_path: Path) -> None:
    text = POLICY.replace("roles_claim: groups", "client_auth: client_secret_post")
    login = policy_at(tmp_path, text).login
    assert login is not None and login.metadata is not None
    request = oidc.refresh_request(login, login.metadata, "rt-1")
    form = dict(parse_qsl((request.body or b"").decode()))
    assert form == {"grant_type": "refresh_token", "refresh_token": "rt-1",
                    "client_id": "app", "client_secret": "s3cret-s3cret"}  # fmt: skip
    assert "Authorization" not in dict(request.headers)


@pytest.mark.parametrize(
    "status, body, result",
    [
        (200, {"access_token": "a", "token_type": "Bearer", "expires_in": 60, "id_token": "i",
               "refresh_token": "r", "scope": "openid"},
         TokenResponse("a", 60.0, "r", "i", "openid")),
        (200, {"access_token": "a", "token_type": "bearer", "expires_in": "60"},
         TokenResponse("a", 60.0, None, None, None)),
        (200, {"access_token": "a", "token_type": "Bearer", "expires_in": -1},
         TokenResponse("a", None, None, None, None)),
        (200, {"access_token": "a", "token_type": "DPoP"}, (True, "not Bearer")),
        (200, {"token_type": "Bearer"}, (True, "no access_token")),
        (400, {"error": "invalid_grant"}, (True, "refused (400 'invalid_grant')")),
        (401, {"error": "invalid_client"}, (True, "refused (401 'invalid_client')")),
        (400, "not json", (True, "without a JSON object")),
        (500, {"error": "server_error"}, (False, "answered 500")),
        (503, "", (False, "answered 503")),
        (429, "", (False, "answered 429")),
        (302, "", (False, "answered 302")),
    ],
)  # fmt: skip
def test_token_responses(status: int, body: Any, result: Any) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    got = oidc.token_response(status, raw)
    if isinstance(result, TokenResponse):
        assert got == result
    else:
        assert isinstance(got, tuple) and got[0] == result[0] and result[1] in got[1]


# --- the ID token -----------------------------------------------------------------------------


def at_hash(token: str) -> str:
    half = hashlib.sha256(token.encode()).digest()[:16]
    return base64.urlsafe_b64encode(half).decode().rstrip("=")


@pytest.mark.parametrize(
    "token, why",
    [
        (id_token(), None),
        (id_token(aud=["app", "other"], azp="app"), None),
        (id_token(at_hash=at_hash("at-1")), None),
        (id_token(key=STRANGER), "bad_signature"),
        (id_token(kid="k2"), "unknown_key"),
        (id_token(iss="https://evil.example"), "wrong_issuer"),
        (id_token(aud="other-client"), "wrong_audience"),
        (id_token(aud=["app", "other"]), "several audiences and no azp"),
        (id_token(azp="other-client"), "azp"),
        (id_token(exp=NOW - 120), "expired"),
        (id_token(exp=None), "missing_claim"),
        (id_token(iat=None), "missing_claim"),
        (id_token(iat=NOW + 600), "issued in the future"),
        (id_token(iat=NOW - 3600), "before this login began"),
        (id_token(nonce="n-other"), "nonce"),
        (id_token(nonce=None), "nonce"),
        (id_token(at_hash=at_hash("at-other")), "at_hash"),
        (id_token(sub=None), "missing_claim"),
        (jwt.encode({"iss": ISS, "sub": "a", "aud": "app", "iat": NOW, "exp": NOW + 60,
                     "nonce": "n-1"}, "k" * 32, algorithm="HS256", headers={"kid": "k1"}),
         "wrong_algorithm"),
        ("not.a.token", "malformed"),
    ],
)  # fmt: skip
def test_id_token_validation(login: Login, token: str, why: str | None) -> None:
    def check() -> dict[str, Any]:
        return oidc.validate_id_token(
            login, token, NOW + 5, nonce="n-1", started=NOW - 10, access_token="at-1"
        )

    if why is None:
        assert check()["sub"] == "alice"
    else:
        with pytest.raises(LoginRejected) as info:
            check()
        assert why in info.value.detail


def test_id_token_without_the_providers_keys_yet(tmp_path: Path) -> None:
    login = policy_at(tmp_path, loaded=False).login
    assert login is not None
    with pytest.raises(KeysUnavailable):
        oidc.validate_id_token(login, id_token(), NOW, nonce="n-1", started=NOW, access_token="a")


def test_a_refresh_may_not_change_sub(login: Login) -> None:
    refreshed = id_token(sub="mallory", nonce=None)
    with pytest.raises(LoginRejected) as info:
        oidc.validate_id_token(login, refreshed, NOW, nonce=None, started=None,
                               access_token=None, sub="alice")  # fmt: skip
    assert "changed sub" in info.value.detail


# --- finishing a login --------------------------------------------------------------------------


def exchanged(login: Login, **tokens: Any) -> CodeExchange:
    state, cookie, pending = begun(login)
    work = oidc.callback(login, urlencode({"code": "c", "state": state, "iss": ISS}), [cookie], NOW)
    assert isinstance(work, CodeExchange)
    defaults = {"access_token": "at-1", "expires_in": 300.0, "refresh_token": "rt-1",
                "id_token": id_token(nonce=pending.nonce), "scope": "openid email"}  # fmt: skip
    work.tokens = TokenResponse(**{**defaults, **tokens})
    return work


def session_value(answer: oidc.Answer, login: Login) -> str:
    """The session cookie's value in the answer (its pieces joined)."""
    pairs = [c.split(";")[0].split("=", 1) for c in answer.cookies]
    fields = "; ".join(f"{n}={v}" for n, v in pairs if v)
    found = oidc.find_session(login, [fields])
    assert found is not None
    return found


def test_a_login_completes(login: Login) -> None:
    work = exchanged(login)
    answer = oidc.finish(work, NOW + 5)
    assert (answer.status, answer.reason, answer.location) == (303, oidc.LOGIN_COMPLETE, "/app")
    assert answer.identity is not None and answer.identity.subject == "alice"
    assert answer.identity.roles == frozenset({"admin"})
    assert answer.identity.scopes == frozenset({"openid", "email"})
    names = [c.split("=")[0] for c in answer.cookies]
    assert names == ["__Host-authgate_session", names[1]] and names[1].startswith("__Secure-")
    assert answer.cookies[0].endswith("; Path=/; Max-Age=3600; HttpOnly; Secure; SameSite=Lax")
    # The comment says what happened, never a token, the code or the secret.
    assert "ID token: JWT" in answer.detail and "alice@example.com" in answer.detail
    for secret in ("at-1", "rt-1", "s3cret", work.code + "&", work.pending.verifier):
        assert secret not in answer.detail
    session = oidc.open_session(login, session_value(answer, login))
    assert session is not None
    assert (session.sub, session.access_token, session.refresh_token) == ("alice", "at-1", "rt-1")
    assert "nonce" not in session.claims and session.claims["email"] == "alice@example.com"


def test_a_nonce_counts_once(login: Login) -> None:
    work = exchanged(login)
    assert oidc.finish(work, NOW + 5).status == 303
    replay = dataclasses.replace(work)
    answer = oidc.finish(replay, NOW + 6)
    assert (answer.status, answer.reason) == (400, oidc.LOGIN_FAILED)
    assert "nonce was used" in answer.detail


@pytest.mark.parametrize(
    "change, status, why",
    [
        ({"id_token": None}, 400, "no ID token"),
        ({"id_token": id_token(nonce="n-other")}, 400, "nonce"),
        ({"problem": "refused (400 'invalid_grant')", "tokens": None}, 400, "invalid_grant"),
        ({"unavailable": True, "problem": "connection refused", "tokens": None}, 503, "refused"),
    ],
)
def test_logins_that_fail(login: Login, change: dict[str, Any], status: int, why: str) -> None:
    work = exchanged(login)
    if "id_token" in change:
        assert work.tokens is not None
        work.tokens = dataclasses.replace(work.tokens, id_token=change["id_token"])
    for name in ("problem", "tokens", "unavailable"):
        if name in change:
            setattr(work, name, change[name])
    answer = oidc.finish(work, NOW + 5)
    assert answer.status == status and why in answer.detail
    if status == 503:
        # The pre-login cookie stays: the same callback works once the provider is back.
        assert answer.cookies == () and dict(answer.headers)["Retry-After"] == "5"
    else:
        assert answer.cookies == work.clears


@pytest.mark.parametrize("bio, fits", [(7_000, True), (10_000, False)])
def test_a_session_too_big_for_three_cookies(login: Login, bio: int, fits: bool) -> None:
    work = exchanged(login)
    assert work.tokens is not None
    work.tokens = dataclasses.replace(
        work.tokens, id_token=id_token(nonce=work.pending.nonce, bio="x" * bio)
    )
    answer = oidc.finish(work, NOW + 5)
    if fits:
        # Without the ID token (kept only as the logout's hint) it fits.
        session = oidc.open_session(login, session_value(answer, login))
        assert answer.status == 303 and session is not None and session.id_token is None
    else:
        assert answer.status == 400 and "more than 3 cookies" in answer.detail


def test_a_large_session_takes_several_cookies(login: Login) -> None:
    work = exchanged(login)
    assert work.tokens is not None
    work.tokens = dataclasses.replace(
        work.tokens, id_token=id_token(nonce=work.pending.nonce, bio="x" * 3_000)
    )
    answer = oidc.finish(work, NOW + 5)
    names = [c.split("=")[0] for c in answer.cookies]
    assert names[:3] == ["__Host-authgate_session", "__Host-authgate_session.1",
                         "__Host-authgate_session.2"]  # fmt: skip
    assert oidc.check_session(login, session_value(answer, login), NOW + 6).identity is not None


# --- sessions on requests ---------------------------------------------------------------------


def make_session(login: Login, **fields: Any) -> str:
    base = Session(
        sub="alice", claims={"iss": ISS, "sub": "alice", "groups": ["admin"]},
        scopes=("openid",), login_at=NOW, seen_at=NOW, access_token="at-1",
        access_issued=NOW, access_expires=NOW + 300, refresh_token="rt-1", id_token=None,
    )  # fmt: skip
    cookies_ = oidc.seal_session(login, dataclasses.replace(base, **fields))
    return cookies_[0].split(";")[0].split("=", 1)[1]


@pytest.mark.parametrize(
    "fields, at, code",
    [
        ({}, NOW + 10, ""),
        ({}, NOW + 599, ""),  # idle 10 minutes
        ({}, NOW + 600, "session_idle"),
        ({"seen_at": NOW + 3000}, NOW + 3500, ""),
        ({"seen_at": NOW + 3500}, NOW + 3600, "session_expired"),  # absolute 1 hour
        ({"access_expires": NOW + 5}, NOW + 10, "provider_unavailable"),  # due, not refreshed
        ({"access_expires": NOW + 5, "refresh_token": None}, NOW + 10, ""),  # nothing to refresh
    ],
)
def test_session_lifetimes(login: Login, fields: dict[str, Any], at: float, code: str) -> None:
    fields = {"access_expires": None, **fields}  # no refresh unless the case says
    checked = oidc.check_session(login, make_session(login, **fields), at)
    assert checked.code == code
    assert (checked.identity is not None) == (code == "")
    if code in ("session_idle", "session_expired"):
        assert checked.cookies == (
            "__Host-authgate_session=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax",
        )


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "",
        Sealer([bytes(32)]).seal(b"{}", b"session|authgate_session|app"),  # another key
        Sealer([SESSION_KEY]).seal(b"{}", b"login|authgate_session|app"),  # a pre-login cookie
        Sealer([SESSION_KEY]).seal(b'{"v": 1}', b"session|authgate_session|app"),  # not a session
    ],
)
def test_cookies_that_are_no_session(login: Login, value: str) -> None:
    checked = oidc.check_session(login, value, NOW)
    assert (checked.identity, checked.code) == (None, "bad_session")


def test_a_tampered_session(login: Login) -> None:
    value = make_session(login)
    tampered = value[:40] + ("A" if value[40] != "A" else "B") + value[41:]
    assert oidc.check_session(login, tampered, NOW).code == "bad_session"
    assert oidc.check_session(login, value, NOW).code == ""


def test_a_session_in_use_is_touched_now_and_then(login: Login) -> None:
    value = make_session(login, access_expires=None)
    assert oidc.check_session(login, value, NOW + 30).cookies == ()
    touched = oidc.check_session(login, value, NOW + 61)  # a tenth of idle
    assert len(touched.cookies) == 1
    later = touched.cookies[0].split(";")[0].split("=", 1)[1]
    assert oidc.check_session(login, later, NOW + 61 + 599).code == ""
    assert oidc.check_session(login, value, NOW + 600).code == "session_idle"


def test_refresh_is_due_before_the_access_token_expires(login: Login) -> None:
    value = make_session(login)  # 300 s access token, refresh_before 60 s
    assert oidc.refresh_work(login, value, NOW + 239) is None
    work = oidc.refresh_work(login, value, NOW + 240)
    assert work is not None and work.session.refresh_token == "rt-1" and work.pieces == 1
    short = make_session(login, access_expires=NOW + 10)  # at most half its life
    assert oidc.refresh_work(login, short, NOW + 4) is None
    assert oidc.refresh_work(login, short, NOW + 5) is not None
    assert oidc.refresh_work(login, make_session(login, refresh_token=None), NOW + 299) is None


def test_a_refresh_the_provider_grants(login: Login) -> None:
    value = make_session(login)
    work = oidc.refresh_work(login, value, NOW + 250)
    assert work is not None
    tokens = TokenResponse("at-2", 300.0, "rt-2", id_token(nonce=None, iat=NOW + 250), None)
    entry = oidc.refreshed(work, tokens, None, NOW + 250)
    assert entry.opened is not None and len(entry.cookies) == 1
    # The old cookie now finds the new session (parallel requests), with its cookie.
    checked = oidc.check_session(login, value, NOW + 251)
    assert checked.identity is not None and checked.cookies == entry.cookies
    # What the flow's comment says: the tokens decoded, not the tokens.
    assert checked.detail.startswith("session refreshed at the provider (a new refresh token); ")
    assert "access token: opaque (4 characters)" in checked.detail
    assert "at-2" not in checked.detail and "rt-2" not in checked.detail
    assert oidc.refresh_work(login, value, NOW + 251) is None  # not twice
    new = entry.cookies[0].split(";")[0].split("=", 1)[1]
    session = oidc.open_session(login, new)
    assert session is not None
    assert (session.access_token, session.refresh_token, session.login_at) == ("at-2", "rt-2", NOW)


def test_a_refresh_the_provider_refuses_ends_the_session(login: Login) -> None:
    value = make_session(login)
    work = oidc.refresh_work(login, value, NOW + 250)
    assert work is not None
    refused = (True, "the token endpoint refused (400 'invalid_grant')")
    oidc.refreshed(work, refused, None, NOW + 250)
    checked = oidc.check_session(login, value, NOW + 251)
    assert (checked.identity, checked.code) == (None, "refresh_refused")
    assert checked.cookies[0].startswith("__Host-authgate_session=; ")


def test_a_refresh_that_cannot_reach_the_provider(login: Login) -> None:
    value = make_session(login)
    work = oidc.refresh_work(login, value, NOW + 250)
    assert work is not None
    oidc.refreshed(work, (False, "connection refused"), None, NOW + 250)
    # The access token still holds: carry on; once it expired: 503, try again.
    assert oidc.check_session(login, value, NOW + 251).identity is not None
    assert oidc.refresh_work(login, value, NOW + 252) is None  # not before Retry-After
    late = oidc.check_session(login, value, NOW + 301)
    assert late.code == "provider_unavailable" and late.retry_after is not None


def test_the_access_token_forwarded(tmp_path: Path) -> None:
    text = POLICY.replace("roles_claim: groups", "forward_access_token: true")
    login = policy_at(tmp_path, text).login
    assert login is not None
    checked = oidc.check_session(login, make_session(login), NOW + 1)
    assert checked.forward == (("Authorization", "Bearer at-1"),)
    gone = oidc.check_session(login, make_session(login, refresh_token=None), NOW + 301)
    assert gone.code == "access_token_expired"


# --- the logout -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, same",
    [
        ([("sec-fetch-site", "same-origin")], True),
        ([("sec-fetch-site", "same-site")], False),
        ([("sec-fetch-site", "cross-site"), ("origin", "https://app.example")], False),
        ([("sec-fetch-site", "none")], False),
        ([("origin", "https://app.example")], True),
        ([("origin", "https://APP.example")], True),
        ([("origin", "https://evil.example")], False),
        ([("origin", "null")], False),
        ([("origin", "https://app.example.evil.example")], False),
        ([("referer", "https://app.example/app/settings")], True),
        ([("referer", "https://evil.example/https://app.example/")], False),
        ([], False),
    ],
)
def test_same_origin(login: Login, headers: list[tuple[str, str]], same: bool) -> None:
    assert oidc.same_origin(login, headers) is same


def test_logout(login: Login) -> None:
    value = make_session(login, id_token="the-id-token")
    headers = [("origin", "https://app.example"), ("cookie", f"__Host-authgate_session={value}")]
    answer = oidc.logout(login, "POST", headers, NOW)
    assert (answer.status, answer.reason) == (303, oidc.LOGGED_OUT)
    assert answer.cookies == (
        "__Host-authgate_session=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax",
    )
    q = dict(parse_qsl(urlsplit(answer.location or "").query))
    assert (answer.location or "").startswith(f"{ISS}/session/end?")
    assert q == {"client_id": "app", "post_logout_redirect_uri": "https://app.example/",
                 "id_token_hint": "the-id-token"}  # fmt: skip
    assert oidc.logout(login, "GET", headers, NOW).status == 405
    cross = [("origin", "https://evil.example"), headers[1]]
    refused = oidc.logout(login, "POST", cross, NOW)
    assert (refused.status, refused.reason, refused.cookies) == (403, oidc.CROSS_SITE, ())


def test_logout_without_an_end_session_endpoint(login: Login) -> None:
    assert login.issuer.remote is not None
    login.issuer.remote.metadata = ProviderMetadata(ISS, f"{ISS}/a", f"{ISS}/t", None, None, False)
    answer = oidc.logout(login, "POST", [("sec-fetch-site", "same-origin")], NOW)
    assert (answer.status, answer.location) == (303, "https://app.example/")


# --- the decision -----------------------------------------------------------------------------


def ask(
    policy: Policy, path: str, headers: tuple[tuple[str, str], ...] = (), method: str = "GET"
) -> Any:
    return judge(policy, RequestView(method, path, headers, "127.0.0.1"), NOW + 1, MemoryStore())


PAGE = (("accept", "text/html"), ("sec-fetch-mode", "navigate"))


def test_decisions(policy: Policy, login: Login) -> None:
    # A page load without a session goes to START; anything else gets the 401.
    d = ask(policy, "/app/orders?x=1", PAGE)
    assert (d.status, d.reason, dict(d.headers)["Location"]) == (
        303, "login_redirect", "/oauth2/start?next=%2Fapp%2Forders%3Fx%3D1")  # fmt: skip
    d = ask(policy, "/app/orders", (("accept", "application/json"),))
    assert (d.status, d.reason) == (401, "no_credentials")
    assert d.challenges == (("Cookie", (("form-action", "/oauth2/start"),
                                        ("cookie-name", "__Host-authgate_session"))),)  # fmt: skip
    # A session: allowed, with the identity headers.
    cookie = ("cookie", f"__Host-authgate_session={make_session(login)}")
    d = ask(policy, "/app/orders", (cookie,))
    assert d.allowed and dict(d.upstream_headers)["X-Auth-Subject"] == "alice"
    assert dict(d.upstream_headers)["X-Auth-Issuer"] == ISS
    assert ask(policy, "/admin/x", (cookie,)).allowed  # role admin from groups
    bad = ("cookie", f"__Host-authgate_session={make_session(login, claims={'sub': 'alice'})}")
    assert ask(policy, "/admin/x", (bad,)).status == 403
    # A bad session on a page load: back to the login, the cookie removed.
    d = ask(policy, "/app/orders", (*PAGE, ("cookie", "__Host-authgate_session=garbage")))
    assert (d.status, d.reason) == (303, "login_redirect")
    assert d.cookies[0].startswith("__Host-authgate_session=; ")
    d = ask(policy, "/app/orders", (("cookie", "__Host-authgate_session=garbage"),))
    assert (d.status, d.reason, d.detail) == (401, "invalid_credentials", "bad_session")
    # The endpoints are the gateway's, whatever the rules say, in every mode.
    d = ask(policy, "/oauth2/start?next=%2Fapp")
    assert (d.status, d.reason, d.rule) == (303, oidc.LOGIN_START, None)
    report = dataclasses.replace(policy, mode_override="report")
    assert ask(report, "/oauth2/callback?state=x&code=y").status == 400
    assert not ask(report, "/oauth2/callback?state=x&code=y").forwarded
    assert ask(policy, "/oauth2/logout").status == 405


def test_two_session_cookies_are_ambiguous(login: Login) -> None:
    value = make_session(login)
    headers = [("cookie", f"__Host-authgate_session={value}; __Host-authgate_session={value}")]
    with pytest.raises(Ambiguous):
        find((), None, None, headers, "", login=login)
    presented, _ = find((), None, None, [("cookie", f"__Host-authgate_session={value}")], "",
                        login=login)  # fmt: skip
    assert presented is not None and presented.kind == OIDC and presented.value == value


def test_sessions_over_plain_http_are_said_to_travel_in_clear(tmp_path: Path) -> None:
    text = POLICY.replace("https://app.example", "http://app.example").replace(
        "    roles_claim: groups\n", "    roles_claim: groups\n    allow_http: true\n")  # fmt: skip
    policy = policy_at(tmp_path, text, loaded=False)
    assert credentials_in_clear(policy, "0.0.0.0:8080") == [
        ("session cookies (an http:// redirect_uri)", 4)
    ]
    assert credentials_in_clear(policy, "127.0.0.1:8080") == []
    assert credentials_in_clear(policy_at(tmp_path, loaded=False), "0.0.0.0:8080") == []
