"""`authgate config nginx|caddy|traefik|envoy` (tools/proxyconfig.py): the
text of each configuration, as tables. The nginx and Caddy files run for
real in test_service_proxies.py; Traefik's and Envoy's are checked here for
their YAML and their fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from authgate import cli
from authgate.core.model import TRUSTED_BY_BACKENDS
from authgate.policy.load import load_policy
from authgate.tools import proxyconfig
from authgate.tools.proxyconfig import Address, parse_address, spellings
from conftest import EXAMPLE

ARGS = ("127.0.0.1:9191", "http://127.0.0.1:9000", "127.0.0.1:8080")
IDENTITY = ["X-Auth-Subject", "X-Auth-Roles", "X-Auth-Scopes", "X-Auth-Issuer"]

# A policy that changes what is stripped and what authgate reads.
OWN_POLICY = """\
version: 1
authn:
  api_keys:
    header: X-Api-Token
    keys:
      - {name: bot, sha256: 89a0168d0c0d32ac4121e2e258247d720901c23ace1b7136a66c1dc4a6e8112e}
limits:
  - {name: per-app, key: "header:X-App-Id", rate: 10/minute}
rules:
  - name: all
    match: {path: "/**"}
    allow: authenticated
forward_credentials: false
strip_headers:
  add: [X-Employee-Id]
  keep: [Remote-User]
"""


@pytest.fixture(autouse=True)
def _keys(demo_key: Any) -> None:
    """The demo keys exist (the example policy reads policies/keys/jwks.json)."""


@pytest.fixture
def own(tmp_path: Path) -> Any:
    path = tmp_path / "own.yaml"
    path.write_text(OWN_POLICY)
    return load_policy(str(path))


# --- addresses and names --------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:9000", Address("127.0.0.1", 9000)),
        ("http://127.0.0.1:9000", Address("127.0.0.1", 9000)),
        ("HTTP://127.0.0.1:9000/", Address("127.0.0.1", 9000)),
        ("backend.internal:80", Address("backend.internal", 80)),
        ("[::1]:9191", Address("::1", 9191)),
        (" 0.0.0.0:8080 ", Address("0.0.0.0", 8080)),
        ("9191", Address("127.0.0.1", 9191)),  # as `authgate serve --listen` reads it
        (":9191", Address("127.0.0.1", 9191)),
    ],
)
def test_addresses(text: str, expected: Address) -> None:
    assert parse_address(text, "--upstream") == expected


@pytest.mark.parametrize(
    "text,error",
    [
        ("https://127.0.0.1:9000", "only http://"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:0", "expected HOST:PORT"),
        ("127.0.0.1:65536", "expected HOST:PORT"),
        ("127.0.0.1:http", "expected HOST:PORT"),
        ("http://127.0.0.1:9000/api", "has no path"),
        ("::1:9000", "in brackets"),
        ("[127.0.0.1]:9000", "not an IPv6 address"),
        ("bad_host:9000", "not a host name or address"),
        ("a b:9000", "not a host name or address"),
    ],
)
def test_bad_addresses(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=f"--upstream '.*': .*{error}"):
        parse_address(text, "--upstream")


@pytest.mark.parametrize(
    "address,text",
    [(Address("127.0.0.1", 1), "127.0.0.1:1"), (Address("::1", 2), "[::1]:2")],
)
def test_address_text(address: Address, text: str) -> None:
    assert str(address) == text and address.url == f"http://{text}"


@pytest.mark.parametrize(
    "name,expected",
    [
        ("te", ["Te"]),
        ("remote-user", ["Remote-User", "remote_user"]),
        ("x-forwarded-user", ["X-Forwarded-User", "x-forwarded_user", "x_forwarded-user",
                              "x_forwarded_user"]),
    ],
)  # fmt: skip
def test_every_spelling_of_a_field(name: str, expected: list[str]) -> None:
    assert spellings(name) == expected


def test_every_default_field_has_all_its_spellings() -> None:
    for name in TRUSTED_BY_BACKENDS:
        found = spellings(name)
        assert len(set(found)) == 2 ** name.count("-")
        assert {s.lower().replace("_", "-") for s in found} == {name}


# --- what a policy changes --------------------------------------------------------------


def test_without_a_policy_the_default_list_is_stripped() -> None:
    assert proxyconfig.from_policy(None) == (tuple(sorted(TRUSTED_BY_BACKENDS)), ())


def test_the_example_policy_strips_the_default_list() -> None:
    strip, fields = proxyconfig.from_policy(load_policy(str(EXAMPLE)))
    assert strip == tuple(sorted(TRUSTED_BY_BACKENDS))
    assert fields == ()


def test_a_policy_adds_keeps_and_hides_credentials(own: Any) -> None:
    strip, fields = proxyconfig.from_policy(own)
    assert "x-employee-id" in strip  # strip_headers.add
    assert "remote-user" not in strip  # strip_headers.keep
    assert {"authorization", "x-api-token"} <= set(strip)  # forward_credentials: false
    assert not set(strip) & {name.lower() for name in IDENTITY}  # replaced, not stripped
    assert fields == ("x-api-token", "x-app-id")  # the API key and a limit's header


@pytest.mark.parametrize("kind", proxyconfig.KINDS)
def test_token_cookies_the_proxy_cannot_remove_are_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "cookies.yaml"
    text = OWN_POLICY.replace(
        "  api_keys:",
        "  jwt:\n    - {name: s, issuer: https://i.example, audience: api, algorithms: [RS256],"
        " jwks_file: %s, cookie: session}\n  api_keys:" % (EXAMPLE.parent / "keys" / "jwks.json"),
    )
    path.write_text(text)
    out = proxyconfig.generate(kind, *ARGS, policy=load_policy(str(path)))
    assert "# NOTE: the backend still receives the token cookies (session)" in out
    assert "token cookies" not in proxyconfig.generate(kind, *ARGS)


def test_a_policy_reading_forwarded_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "forwarded.yaml"
    path.write_text(
        OWN_POLICY + "client_ip: {trusted_proxies: [127.0.0.1/32], header: Forwarded}\n"
    )
    with pytest.raises(ValueError, match="client_ip.header is forwarded; .* X-Forwarded-For"):
        proxyconfig.nginx(*ARGS, policy=load_policy(str(path)))


# --- nginx ---------------------------------------------------------------------------------

NGINX_LINES = [
    # the check: /nginx, no body, the original request described, keep-alive
    "location = /_authgate/check {",
    "internal;",
    "proxy_pass http://authgate_decisions/nginx;",
    "proxy_pass_request_body off;",
    'proxy_set_header Content-Length "";',
    "proxy_set_header X-Forwarded-Method $request_method;",
    "proxy_set_header X-Forwarded-Uri $request_uri;",
    "proxy_set_header X-Forwarded-Host $http_host;",
    "proxy_set_header X-Forwarded-Proto $scheme;",
    "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    "proxy_set_header X-Request-Id $request_id;",
    "proxy_http_version 1.1;",
    'proxy_set_header Connection "";',
    "keepalive 16;",
    "proxy_connect_timeout 2s;",
    "proxy_read_timeout 5s;",
    # the answer: captured, denials replayed by /_answer, 503 when authgate fails
    "auth_request /_authgate/check;",
    "auth_request_set $authgate_decision $upstream_http_x_authgate_decision;",
    "auth_request_set $authgate_answer $upstream_http_x_authgate_answer;",
    "auth_request_set $authgate_subject $upstream_http_x_auth_subject;",
    "auth_request_set $authgate_request_id $upstream_http_x_request_id;",
    "error_page 401 403 = @authgate_answer;",
    "error_page 500 = @authgate_unavailable;",
    "rewrite ^ /_answer break;",
    "proxy_set_header X-Authgate-Answer $authgate_answer;",
    "error_page 502 504 = @authgate_unavailable;",
    "add_header Retry-After 5 always;",
    # forward only on an affirmative allow
    "map $authgate_decision $authgate_route {",
    "allow authgate_backend;",
    "default authgate_decisions;",
    "proxy_pass http://$authgate_route;",
    "proxy_set_header X-Authgate-Refused $authgate_refused;",
    "proxy_set_header X-Auth-Subject $authgate_subject;",
    "proxy_set_header X-Auth-Roles $authgate_roles;",
    "proxy_set_header X-Auth-Scopes $authgate_scopes;",
    "proxy_set_header X-Auth-Issuer $authgate_issuer;",
    "proxy_set_header X-Request-Id $authgate_request_id;",
    # the addresses
    "server 127.0.0.1:9191;",
    "server 127.0.0.1:9000;",
    "listen 127.0.0.1:8080;",
]


def _lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines()]


@pytest.mark.parametrize("line", NGINX_LINES)
def test_nginx_has(line: str) -> None:
    assert line in _lines(proxyconfig.nginx(*ARGS))


def test_nginx_braces_balance() -> None:
    text = proxyconfig.nginx(*ARGS)
    assert text.count("{") == text.count("}")


def test_nginx_strips_what_the_policy_strips(own: Any) -> None:
    lines = _lines(proxyconfig.nginx(*ARGS, policy=own))
    assert 'proxy_set_header X-Employee-Id "";' in lines
    assert 'proxy_set_header Authorization "";' in lines
    assert 'proxy_set_header X-Api-Token "";' in lines
    assert 'proxy_set_header Remote-User "";' not in lines
    assert 'proxy_set_header X-Auth-Subject "";' not in lines  # set from authgate's answer
    default = _lines(proxyconfig.nginx(*ARGS))
    assert 'proxy_set_header Remote-User "";' in default
    assert 'proxy_set_header Authorization "";' not in default


@pytest.mark.parametrize(
    "listen,line",
    [("[::]:8080", "listen [::]:8080;"), ("0.0.0.0:80", "listen 0.0.0.0:80;")],
)
def test_nginx_listens(listen: str, line: str) -> None:
    assert line in _lines(proxyconfig.nginx(ARGS[0], ARGS[1], listen))


@pytest.mark.parametrize("access_log,line", [(False, "access_log off;"), (True, "access_log ")])
def test_nginx_main_wraps_the_configuration(tmp_path: Path, access_log: bool, line: str) -> None:
    inner = proxyconfig.nginx(*ARGS)
    text = proxyconfig.nginx_main(inner, tmp_path, workers=2, access_log=access_log)
    lines = _lines(text)
    assert "worker_processes 2;" in lines
    assert f'pid "{tmp_path.resolve()}/nginx.pid";' in lines
    assert f'error_log "{tmp_path.resolve()}/error.log";' in lines
    assert "events {}" in lines and "http {" in lines
    assert any(x.startswith(line) for x in lines)
    assert text.count("{") == text.count("}")


# --- Caddy ---------------------------------------------------------------------------------

CADDY_LINES = [
    "http://:8080 {",
    "bind 127.0.0.1",
    "reverse_proxy 127.0.0.1:9191 {",
    "method GET",
    "rewrite /auth",
    "header_up X-Forwarded-Method {method}",
    "header_up X-Forwarded-Uri {uri}",
    "header_up -X-Request-Id",
    "@allow {",
    "status 2xx",
    "header X-Authgate-Decision allow",
    "handle_response @allow {",
    'request_header X-Auth-Subject "{http.reverse_proxy.header.X-Auth-Subject}"',
    'request_header X-Request-Id "{http.reverse_proxy.header.X-Request-Id}"',
    "vars authgate_allowed yes",
    "@not_authgate status 2xx",
    "import authgate_unavailable",
    "reverse_proxy 127.0.0.1:9000 {",
    "header_up -Remote-User",
    "header_up -remote_user",
    "handle_errors {",
    "not vars authgate_allowed yes",
    "header Retry-After 5",
    "dial_timeout 2s",
    "response_header_timeout 5s",
]


@pytest.mark.parametrize("line", CADDY_LINES)
def test_caddy_has(line: str) -> None:
    assert line in _lines(proxyconfig.caddy(*ARGS))


def test_caddy_defines_its_snippet_before_the_site() -> None:
    text = proxyconfig.caddy(*ARGS)
    assert text.index("(authgate_unavailable) {") < text.index("http://:8080 {")
    assert text.count("{") == text.count("}")


def test_caddy_on_every_interface_binds_no_address() -> None:
    lines = _lines(proxyconfig.caddy(ARGS[0], ARGS[1], "0.0.0.0:8080"))
    assert "http://:8080 {" in lines
    assert not any(line.startswith("bind") for line in lines)


def test_caddy_strips_every_spelling(own: Any) -> None:
    lines = _lines(proxyconfig.caddy(*ARGS, policy=own))
    for spelled in spellings("x-forwarded-user") + ["X-Employee-Id", "x_employee_id"]:
        assert f"header_up -{spelled}" in lines
    assert "header_up -Remote-User" not in lines


# --- Traefik --------------------------------------------------------------------------------


def test_traefik_forward_auth() -> None:
    doc = yaml.safe_load(proxyconfig.traefik(*ARGS))
    http = doc["http"]
    assert http["routers"]["authgate"] == {
        "entryPoints": ["web"],
        "rule": "PathPrefix(`/`)",
        "middlewares": ["authgate-strip", "authgate"],
        "service": "authgate-backend",
    }
    assert http["middlewares"]["authgate"] == {
        "forwardAuth": {
            "address": "http://127.0.0.1:9191/auth",
            "trustForwardHeader": False,
            "authResponseHeaders": [*IDENTITY, "X-Request-Id"],
        }
    }
    assert http["services"]["authgate-backend"] == {
        "loadBalancer": {"servers": [{"url": "http://127.0.0.1:9000"}]}
    }
    removed = http["middlewares"]["authgate-strip"]["headers"]["customRequestHeaders"]
    assert set(removed.values()) == {""}
    assert {"Remote-User", "remote_user", "X-Forwarded-User", "x_forwarded_user"} <= set(removed)


def test_traefik_strips_what_the_policy_strips(own: Any) -> None:
    doc = yaml.safe_load(proxyconfig.traefik(*ARGS, policy=own))
    removed = doc["http"]["middlewares"]["authgate-strip"]["headers"]["customRequestHeaders"]
    assert {"X-Employee-Id", "Authorization", "X-Api-Token"} <= set(removed)
    assert "Remote-User" not in removed


def test_traefik_names_the_static_entry_point() -> None:
    text = proxyconfig.traefik(*ARGS)
    assert '#       address: "127.0.0.1:8080"' in text.splitlines()


# --- Envoy ----------------------------------------------------------------------------------


def _envoy(policy: Any = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the bootstrap, the connection manager, the ext_authz filter's config)."""
    doc = yaml.safe_load(proxyconfig.envoy(*ARGS, policy=policy))
    [listener] = doc["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    [hcm] = chain["filters"]
    config = hcm["typed_config"]
    authz, router = config["http_filters"]
    assert router["name"] == "envoy.filters.http.router"
    assert authz["name"] == "envoy.filters.http.ext_authz"
    return doc, config, authz["typed_config"]


def _exact(matcher: dict[str, Any]) -> list[str]:
    return [p["exact"] for p in matcher["patterns"]]


def test_envoy_ext_authz() -> None:
    _, _, authz = _envoy()
    assert authz["@type"].endswith("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz")
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    service = authz["http_service"]
    assert service["path_prefix"] == "/envoy"
    assert service["server_uri"] == {
        "uri": "http://127.0.0.1:9191",
        "cluster": "authgate_decisions",
        "timeout": "5s",
    }
    asked = _exact(service["authorization_request"]["allowed_headers"])
    assert {"authorization", "cookie", "accept", "x-forwarded-for", "x-request-id"} <= set(asked)
    response = service["authorization_response"]
    assert _exact(response["allowed_upstream_headers"]) == sorted(
        [name.lower() for name in IDENTITY] + ["x-request-id"]
    )
    given = set(_exact(response["allowed_client_headers"]))
    assert {"www-authenticate", "retry-after", "ratelimit", "ratelimit-policy"} <= given
    assert {"location", "content-type", "x-authgate-decision"} <= given


def test_envoy_listener_routes_and_clusters() -> None:
    doc, config, _ = _envoy()
    [listener] = doc["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}
    assert config["use_remote_address"] is True
    assert config["common_http_protocol_options"] == {
        "headers_with_underscores_action": "DROP_HEADER"
    }
    routes = config["route_config"]
    assert routes["virtual_hosts"][0]["routes"] == [
        {"match": {"prefix": "/"}, "route": {"cluster": "authgate_backend"}}
    ]
    removed = routes["request_headers_to_remove"]
    assert "remote-user" in removed
    assert not {name.lower() for name in IDENTITY} & set(removed)
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    for name, port in (("authgate_decisions", 9191), ("authgate_backend", 9000)):
        [endpoints] = clusters[name]["load_assignment"]["endpoints"]
        [endpoint] = endpoints["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert address == {"address": "127.0.0.1", "port_value": port}


def test_envoy_sends_and_strips_what_the_policy_needs(own: Any) -> None:
    _, config, authz = _envoy(own)
    asked = _exact(authz["http_service"]["authorization_request"]["allowed_headers"])
    assert {"x-api-token", "x-app-id"} <= set(asked)
    removed = config["route_config"]["request_headers_to_remove"]
    assert {"authorization", "x-api-token", "x-employee-id"} <= set(removed)
    assert "remote-user" not in removed


# --- the command ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", proxyconfig.KINDS)
def test_the_command_prints_the_configuration(
    kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["config", kind, "--authgate", ARGS[0], "--upstream", ARGS[1], "--listen", "8080"]
    assert cli.main([*argv, "--policy", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    policy = load_policy(str(EXAMPLE))
    assert out == proxyconfig.generate(kind, *ARGS, policy=policy)
    assert f"# Made by: authgate config {kind} --authgate 127.0.0.1:9191" in out


@pytest.mark.parametrize(
    "extra,error",
    [
        (["--upstream", "https://127.0.0.1:9000"], "--upstream 'https://127.0.0.1:9000': only"),
        (["--upstream", "x", "--authgate", "h:x"], "--authgate 'h:x': expected HOST:PORT"),
        (["--upstream", "127.0.0.1:1", "--policy", "/no/such.yaml"], "/no/such.yaml"),
    ],
)
def test_the_command_refuses(
    extra: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["config", "nginx", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("authgate config: ") and error in captured.err


def test_an_unknown_proxy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown proxy 'haproxy'"):
        proxyconfig.generate("haproxy", *ARGS)
