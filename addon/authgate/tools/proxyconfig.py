"""`authgate config nginx|caddy|traefik|envoy`: a proxy's configuration for
putting the decision service (`authgate serve`) in front of a backend. Pure
text generation: addresses and header names in, a configuration file out.

What every configuration does (docs/decision-service.md):

- asks authgate about every request (nginx: /nginx and /_answer; Caddy and
  Traefik: /auth; Envoy: /envoy/PATH), sending the original method, URI,
  host, scheme and client address, never the request body;
- forwards to the backend only when authgate answered (nginx, Caddy: and only
  when the answer says `X-Authgate-Decision: allow`), with authgate's identity
  fields (X-Auth-Subject, -Roles, -Scopes, -Issuer) and X-Request-Id in place
  of whatever the client sent under those names;
- removes the fields the policy strips (`strip_headers`: the default list
  unless the policy changes it; Authorization and the API key field too when
  `forward_credentials: false`);
- gives the client authgate's very answer on a denial (status, headers, body),
  and 503 when authgate cannot answer.

Checked against nginx 1.22.1 and Caddy 2.6.2 (Debian 12) by
tests/test_service_proxies.py; the Traefik (v3 file provider) and Envoy (v3
API) files are checked for their syntax and fields only.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from authgate.core.model import IDENTITY_HEADERS, TRUSTED_BY_BACKENDS, Policy
from authgate.service.checks import ANSWER, DECISION, ENVOY_PREFIX, IDENTITY, REFUSED

KINDS = ("nginx", "caddy", "traefik", "envoy")
RETRY_AFTER = 5  # seconds, on the 503 a proxy gives when authgate cannot answer
# The proxy's own 503 when authgate is down, slow or not the one answering:
# the body authgate itself gives for its 503 (core/responses.py).
UNAVAILABLE_BODY = (
    '{"type": "about:blank", "title": "Service Unavailable", "status": 503, '
    '"detail": "The gateway cannot judge requests right now. Retry later."}'
)
# What authgate reads from a request besides method, target and Host (Envoy
# sends only the fields it is told to): credentials, content negotiation
# (core/negotiation.py), CORS preflights, the client address, the request id.
CHECK_FIELDS = (
    "authorization",
    "cookie",
    "accept",
    "sec-fetch-mode",
    "x-requested-with",
    "origin",
    "access-control-request-method",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
)
# What an answer of authgate's may carry to the client (core/responses.py,
# core/decision.py): Envoy passes on only the fields it is told to.
ANSWER_FIELDS = (
    "www-authenticate",
    "retry-after",
    "ratelimit-policy",
    "ratelimit",
    "location",
    "set-cookie",  # the login's cookies (authn.oidc)
    "content-type",
    "cache-control",
    "x-content-type-options",
    "x-request-id",
    "x-authgate-decision",
)
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\Z")


@dataclass(frozen=True, slots=True)
class Address:
    """A host and a port, as every proxy's configuration writes them."""

    host: str  # a name, an IPv4 address, or an IPv6 address without brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}"

    @property
    def wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")


def parse_address(text: str, what: str) -> Address:
    """`HOST:PORT` or `http://HOST:PORT` (no path); `[v6]:PORT` for IPv6; a
    port alone (`9191`, `:9191`) is 127.0.0.1, as `authgate serve --listen`
    reads it. Raises ValueError naming `what`."""
    raw = text.strip()
    rest = "127.0.0.1:" + raw.lstrip(":") if raw.lstrip(":").isdigit() else raw
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        if scheme.lower() != "http":
            raise ValueError(
                f"{what} {raw!r}: only http:// (put TLS in front of the proxy, or edit "
                "the configuration's upstream)"
            )
        rest = rest.rstrip("/")
        if "/" in rest or "?" in rest or "#" in rest:
            raise ValueError(f"{what} {raw!r}: an address has no path")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{what} {raw!r}: expected HOST:PORT, e.g. 127.0.0.1:9000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{what} {raw!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{what} {raw!r}: write an IPv6 address in brackets, as in [::1]:9000")
    elif not _HOST.match(host):
        raise ValueError(f"{what} {raw!r}: {host!r} is not a host name or address")
    return Address(host, int(port))


@dataclass(frozen=True, slots=True)
class Site:
    """What a configuration is made of."""

    authgate: Address  # where `authgate serve` listens
    upstream: Address  # the backend
    listen: Address  # where the proxy listens
    # Lower-case names of the client's fields the backend never receives
    # (authgate's identity fields are replaced, not listed here).
    strip: tuple[str, ...] = tuple(sorted(TRUSTED_BY_BACKENDS))
    # Lower-case names of further fields authgate must see (Envoy lists them).
    check_fields: tuple[str, ...] = ()
    policy: str = ""  # the policy file the lists come from ("" none: the defaults)
    # Token cookies that forward_credentials: false would take out of Cookie:
    # no proxy here removes one cookie, so the configuration says so.
    cookies: tuple[str, ...] = ()
    # The policy signs people in (authn.oidc): an allowed check may carry the
    # session's Set-Cookie (refreshed or resealed) for the browser.
    sessions: bool = False


def from_policy(policy: Policy | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the fields to strip, the fields authgate reads beyond CHECK_FIELDS) for a
    policy; None: what a policy without `strip_headers` strips."""
    if policy is None:
        return tuple(sorted(TRUSTED_BY_BACKENDS)), ()
    if policy.client_ip_header != "x-forwarded-for":
        # The proxies write X-Forwarded-For; a client's Forwarded would reach
        # authgate from a trusted peer, as it sent it: a client address of its choosing.
        raise ValueError(
            f"{policy.file}: client_ip.header is {policy.client_ip_header}; the shipped "
            "configurations send the client address in X-Forwarded-For: use "
            "client_ip.header: x-forwarded-for with authgate serve"
        )
    strip = set(policy.strip_headers) - set(IDENTITY_HEADERS)
    extra: set[str] = set()
    if policy.api_keys is not None:
        extra.add(policy.api_keys.header)
    if not policy.forward_credentials:
        strip.add("authorization")
        if policy.api_keys is not None:
            strip.add(policy.api_keys.header)
    specs = [*policy.limits, *(spec for rule in policy.rules for spec in rule.limits)]
    extra |= {spec.header for spec in specs if spec.header}
    return tuple(sorted(strip)), tuple(sorted(extra - set(CHECK_FIELDS)))


def title(name: str) -> str:
    """x-auth-subject -> X-Auth-Subject (field names are case-insensitive;
    this is how people write them)."""
    return "-".join(part[:1].upper() + part[1:] for part in name.split("-"))


def spellings(name: str) -> list[str]:
    """Every spelling of a field name with `-` or `_` at each separator (CGI,
    WSGI and PHP read them all as the same field)."""
    parts = name.split("-")
    out = []
    for seps in product("-_", repeat=len(parts) - 1):
        word = parts[0]
        for sep, part in zip(seps, parts[1:], strict=True):
            word += sep + part
        out.append(title(word) if "_" not in word else word)
    return out


def _var(name: str) -> str:
    """x-auth-subject -> authgate_subject (an nginx variable name)."""
    short = name.lower().removeprefix("x-auth-").removeprefix("x-")
    return "authgate_" + short.replace("-", "_")


def _header_line(site: Site, kind: str) -> list[str]:
    command = f"authgate config {kind} --authgate {site.authgate} --upstream "
    command += f"{site.upstream.url} --listen {site.listen}"
    if site.policy:
        command += f" --policy {site.policy}"
    out = [f"# Made by: {command}"]
    if site.cookies:
        out += [
            f"# NOTE: the backend still receives the token cookies ({', '.join(site.cookies)})",
            "# in Cookie: forward_credentials: false removes them only in `authgate run`.",
        ]
    return out


# --- nginx --------------------------------------------------------------------------


def _nginx(site: Site) -> str:
    check = "/_authgate/check"
    captured = [(name, _var(name)) for name in (*IDENTITY, "X-Request-Id")]
    timeouts = [
        "proxy_connect_timeout 2s;",
        "proxy_send_timeout 5s;",
        "proxy_read_timeout 5s;",
    ]
    out = [
        "# nginx in front of a backend, every request judged by authgate (`authgate serve`).",
        *_header_line(site, "nginx"),
        "#",
        "# This goes inside nginx's http { } block (Debian: /etc/nginx/conf.d/authgate.conf).",
        "# On its own: nginx -c FILE, FILE holding `events {} http { include THIS; }`.",
        "#",
        "# auth_request passes only 2xx, 401 and 403 (anything else becomes 500), so",
        "# authgate's /nginx endpoint answers an allow with 200 and",
        f"# `{DECISION}: allow`, and every denial with 403 and the real answer",
        f"# sealed in {ANSWER}; error_page hands that to authgate's /_answer, which",
        "# gives back the real status, fields and body (303, 400, 401, 403, 404, 429...).",
        "# The backend is reached only on an affirmative allow: any other 2xx at the",
        f"# check location goes to authgate with {title(REFUSED)}, which answers 503.",
        "# When authgate is down or slow the client gets 503 and Retry-After.",
        "",
        "upstream authgate_decisions {",
        f"    server {site.authgate};",
        "    keepalive 16;",
        "    keepalive_timeout 30s;  # below authgate's idle timeout (60 s)",
        "}",
        "upstream authgate_backend {",
        f"    server {site.upstream};",
        "    keepalive 16;",
        "}",
        "",
        "# Where a request goes once checked: the backend on an affirmative allow,",
        "# else authgate (which then answers 503).",
        "map $authgate_decision $authgate_route {",
        "    allow authgate_backend;",
        "    default authgate_decisions;",
        "}",
        "map $authgate_decision $authgate_refused {",
        '    allow "";  # an empty value: nginx sends no field',
        "    default 1;",
        "}",
        "",
        "server {",
        f"    listen {site.listen};",
        "",
        "    location / {",
        f"        auth_request {check};",
        "        auth_request_set $authgate_decision $upstream_http_x_authgate_decision;",
        "        auth_request_set $authgate_answer $upstream_http_x_authgate_answer;",
    ]
    for name, var in captured:
        upstream_var = "$upstream_http_" + name.lower().replace("-", "_")
        out.append(f"        auth_request_set ${var} {upstream_var};")
    if site.sessions:
        out += [
            "        # The login's session, refreshed or resealed on an allowed request,",
            "        # to the browser (its first Set-Cookie: the session while it fits",
            "        # one cookie; an empty value sends nothing).",
            "        auth_request_set $authgate_cookie $upstream_http_set_cookie;",
            "        add_header Set-Cookie $authgate_cookie always;",
        ]
    out += [
        "        # 403: a denial, sealed; 401: not authgate's (it never answers 401 here);",
        "        # 500: auth_request's word for anything else (authgate down, slow, 5xx).",
        "        error_page 401 403 = @authgate_answer;",
        "        error_page 500 = @authgate_unavailable;",
        "        recursive_error_pages on;  # for @authgate_answer's own error_page",
        "",
        "        proxy_pass http://$authgate_route;",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        "        proxy_set_header Host $http_host;",
        "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "        proxy_set_header X-Forwarded-Proto $scheme;",
        "        proxy_set_header X-Forwarded-Host $http_host;",
        f"        proxy_set_header {title(REFUSED)} $authgate_refused;",
        "        # authgate's answer, never the client's (an empty value sends nothing).",
    ]
    out += [f"        proxy_set_header {name} ${var};" for name, var in captured]
    out += [
        "        # Fields backends take as proven (the policy's strip_headers). nginx",
        "        # drops fields with `_` in their names itself (underscores_in_headers off).",
    ]
    out += [f'        proxy_set_header {title(name)} "";' for name in site.strip]
    out += [
        "    }",
        "",
        f"    location = {check} {{",
        "        internal;",
        "        proxy_pass http://authgate_decisions/nginx;",
        "        proxy_method GET;",
        "        proxy_pass_request_body off;",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        '        proxy_set_header Content-Length "";',
        "        proxy_set_header X-Forwarded-Method $request_method;",
        "        proxy_set_header X-Forwarded-Uri $request_uri;",
        "        proxy_set_header X-Forwarded-Host $http_host;",
        "        proxy_set_header X-Forwarded-Proto $scheme;",
        "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "        proxy_set_header X-Request-Id $request_id;",
        f'        proxy_set_header {title(REFUSED)} "";',
        *("        " + t for t in timeouts),
        "        # room for the sealed answer in the answer's header (at most 16 KiB)",
        "        proxy_buffer_size 16k;",
        "        proxy_buffers 4 16k;",
        "    }",
        "",
        "    # authgate gives back the answer it sealed: status, fields and body.",
        "    location @authgate_answer {",
        "        rewrite ^ /_answer break;",
        "        proxy_pass http://authgate_decisions;",
        "        proxy_method GET;",
        "        proxy_pass_request_body off;",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        '        proxy_set_header Content-Length "";',
        f"        proxy_set_header {ANSWER} $authgate_answer;",
        f'        proxy_set_header {title(REFUSED)} "";',
        *("        " + t for t in timeouts),
        "        proxy_intercept_errors off;  # authgate's answer as it is, whatever its status",
        "        # authgate gone between the check and the answer: 503 as well.",
        "        error_page 502 504 = @authgate_unavailable;",
        "    }",
        "",
        "    location @authgate_unavailable {",
        "        default_type application/problem+json;",
        f"        add_header Retry-After {RETRY_AFTER} always;",
        "        add_header Cache-Control no-store always;",
        f"        add_header {DECISION} deny always;",
        f"        return 503 '{UNAVAILABLE_BODY}\\n';",
        "    }",
        "}",
    ]
    return "\n".join(out) + "\n"


def nginx_main(text: str, prefix: Path | str, workers: int = 1, access_log: bool = False) -> str:
    """A whole nginx.conf around `nginx()`'s text, its files in `prefix`
    (`nginx -c FILE -p PREFIX -g 'daemon off;'`), for tests and benchmarks."""
    folder = Path(prefix).resolve()

    def path(name: str) -> str:
        return json.dumps(
            str(folder / name)
        )  # nginx reads a double-quoted string as JSON writes it

    log = f"access_log {path('access.log')};" if access_log else "access_log off;"
    inner = ["    " + line if line else "" for line in text.splitlines()]
    out = [
        f"worker_processes {workers};",
        f"pid {path('nginx.pid')};",
        f"error_log {path('error.log')};",
        "",
        "events {}",
        "",
        "http {",
        f"    {log}",
        "",
        *inner,
        "}",
    ]
    return "\n".join(out) + "\n"


# --- Caddy --------------------------------------------------------------------------


def _caddy(site: Site) -> str:
    fields = [*IDENTITY, "X-Request-Id"]
    bind = "" if site.listen.wildcard else site.listen.host
    out = [
        "# Caddy in front of a backend, every request judged by authgate (`authgate serve`).",
        *_header_line(site, "caddy"),
        "#",
        "# forward_auth written out: the check goes to authgate's /auth; only a 2xx",
        f"# with `{DECISION}: allow` reaches the backend (another 2xx: 503); any",
        "# other answer is authgate's denial, given to the client as it is. authgate",
        "# down or slow: 503 and Retry-After (not Caddy's 502).",
        "",
        "# The 503 when authgate cannot answer (a snippet: defined before its use).",
        "(authgate_unavailable) {",
        f"\theader Retry-After {RETRY_AFTER}",
        "\theader Cache-Control no-store",
        "\theader Content-Type application/problem+json",
        f"\theader {DECISION} deny",
        f"\trespond `{UNAVAILABLE_BODY}` 503",
        "}",
        "",
        f"http://:{site.listen.port} {{",
    ]
    if bind:
        out.append(f"\tbind {bind}")
    out += [
        "\troute {",
        f"\t\treverse_proxy {site.authgate} {{",
        "\t\t\tmethod GET",
        "\t\t\trewrite /auth",
        "\t\t\theader_up X-Forwarded-Method {method}",
        "\t\t\theader_up X-Forwarded-Uri {uri}",
        f"\t\t\theader_up -{title(REFUSED)}",
        "\t\t\theader_up -X-Request-Id  # the client's: authgate makes its own",
        "\t\t\ttransport http {",
        "\t\t\t\tdial_timeout 2s",
        "\t\t\t\tresponse_header_timeout 5s",
        "\t\t\t}",
        "",
        "\t\t\t@allow {",
        "\t\t\t\tstatus 2xx",
        f"\t\t\t\theader {DECISION} allow",
        "\t\t\t}",
        "\t\t\thandle_response @allow {",
        "\t\t\t\t# authgate's values replace the client's (an empty one too).",
    ]
    for name in fields:
        out.append(f'\t\t\t\trequest_header {name} "{{http.reverse_proxy.header.{name}}}"')
    out += [
        "\t\t\t\tvars authgate_allowed yes",
        "\t\t\t}",
        "\t\t\t# A 2xx that is not authgate's allow (a misrouted check): never forward.",
        "\t\t\t@not_authgate status 2xx",
        "\t\t\thandle_response @not_authgate {",
        "\t\t\t\timport authgate_unavailable",
        "\t\t\t}",
        "\t\t\t# Anything else is authgate's denial: the client gets it as it is.",
        "\t\t}",
        "",
        f"\t\treverse_proxy {site.upstream} {{",
        "\t\t\t# Fields backends take as proven (the policy's strip_headers), in",
        "\t\t\t# every spelling (CGI, WSGI and PHP read `_` as `-`).",
    ]
    out += _every_spelling(site, "\t\t\theader_up -{}")
    out += [
        "\t\t}",
        "\t}",
        "",
        "\t# authgate could not be asked (down, refused, timed out): 503, not 502.",
        "\thandle_errors {",
        "\t\t@authgate_down {",
        "\t\t\tnot vars authgate_allowed yes",
        "\t\t}",
        "\t\thandle @authgate_down {",
        "\t\t\timport authgate_unavailable",
        "\t\t}",
        "\t}",
        "}",
    ]
    return "\n".join(out) + "\n"


# --- Traefik ------------------------------------------------------------------------


def _yaml(value: object) -> str:
    """A YAML scalar (JSON's quoting is YAML's)."""
    return json.dumps(value)


def _every_spelling(site: Site, line: str) -> list[str]:
    """`line` for each spelling of each field the proxy removes."""
    return [line.format(spelled) for name in site.strip for spelled in spellings(name)]


def _traefik(site: Site) -> str:
    out = [
        "# Traefik's dynamic configuration (file provider): every request judged by",
        "# authgate (`authgate serve`) before it reaches the backend.",
        *_header_line(site, "traefik"),
        "#",
        "# Traefik forwards on any 2xx from the address below and returns any other",
        "# answer as it is (status, fields, body): keep the address authgate's /auth.",
        "# When authgate cannot be reached Traefik answers 500.",
        "#",
        "# The static configuration (traefik.yml) this file goes with:",
        "#   entryPoints:",
        "#     web:",
        f"#       address: {_yaml(str(site.listen))}",
        "#   providers:",
        "#     file:",
        "#       filename: /etc/traefik/authgate.yml   # this file",
        "",
        "http:",
        "  routers:",
        "    authgate:",
        "      entryPoints: [web]",
        '      rule: "PathPrefix(`/`)"',
        "      middlewares: [authgate-strip, authgate]",
        "      service: authgate-backend",
        "  middlewares:",
        "    authgate:",
        "      forwardAuth:",
        f"        address: {_yaml(site.authgate.url + '/auth')}",
        "        trustForwardHeader: false",
        "        authResponseHeaders:",
    ]
    for name in (*IDENTITY, "X-Request-Id"):
        out.append(f"          - {name}")
    out += [
        "    authgate-strip:",
        "      headers:",
        "        # An empty value removes the field: the client's copies of the fields",
        "        # backends take as proven (the policy's strip_headers), every spelling.",
        "        customRequestHeaders:",
        '          X-Request-Id: ""  # the client\'s: authgate makes its own',
    ]
    out += _every_spelling(site, '          {}: ""')
    out += [
        "  services:",
        "    authgate-backend:",
        "      loadBalancer:",
        "        servers:",
        f"          - url: {_yaml(site.upstream.url)}",
    ]
    return "\n".join(out) + "\n"


# --- Envoy --------------------------------------------------------------------------


def _patterns(names: Iterable[str], indent: str) -> list[str]:
    return [f"{indent}- exact: {_yaml(name)}" for name in names]


def _cluster(name: str, address: Address) -> list[str]:
    return [
        f"    - name: {name}",
        "      type: STRICT_DNS",
        "      connect_timeout: 2s",
        "      load_assignment:",
        f"        cluster_name: {name}",
        "        endpoints:",
        "          - lb_endpoints:",
        "              - endpoint:",
        "                  address:",
        "                    socket_address:",
        f"                      address: {_yaml(address.host)}",
        f"                      port_value: {address.port}",
    ]


def _envoy(site: Site) -> str:
    asked = sorted({*CHECK_FIELDS, *site.check_fields})
    upstream = sorted({name.lower() for name in (*IDENTITY, "X-Request-Id")})
    strip = [name for name in site.strip if name not in upstream]
    hcm = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    out = [
        "# Envoy in front of a backend, every request judged by authgate (`authgate serve`).",
        *_header_line(site, "envoy"),
        "#",
        f"# ext_authz (HTTP service) asks authgate at {ENVOY_PREFIX}/PATH: 200 allows and adds",
        "# authgate's identity fields to the upstream request; any other answer goes to",
        "# the client as it is; authgate down or slow: 503 (status_on_error).",
        "",
        "static_resources:",
        "  listeners:",
        "    - name: authgate_listener",
        "      address:",
        "        socket_address:",
        f"          address: {_yaml(site.listen.host)}",
        f"          port_value: {site.listen.port}",
        "      filter_chains:",
        "        - filters:",
        "            - name: envoy.filters.network.http_connection_manager",
        "              typed_config:",
        f'                "@type": type.googleapis.com/{hcm}',
        "                stat_prefix: authgate_ingress",
        "                use_remote_address: true  # X-Forwarded-For ends with the peer",
        "                common_http_protocol_options:",
        "                  # as nginx does: fields with `_` in their names never pass",
        "                  headers_with_underscores_action: DROP_HEADER",
        "                route_config:",
        "                  name: authgate_routes",
        "                  # Fields backends take as proven (the policy's strip_headers).",
        "                  request_headers_to_remove:",
        *[f"                    - {_yaml(name)}" for name in strip],
        "                  virtual_hosts:",
        "                    - name: backend",
        '                      domains: ["*"]',
        "                      routes:",
        '                        - match: {prefix: "/"}',
        "                          route: {cluster: authgate_backend}",
        "                http_filters:",
        "                  - name: envoy.filters.http.ext_authz",
        "                    typed_config:",
        '                      "@type": type.googleapis.com/'
        "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "                      transport_api_version: V3",
        "                      failure_mode_allow: false",
        "                      status_on_error: {code: ServiceUnavailable}",
        "                      http_service:",
        "                        server_uri:",
        f"                          uri: {_yaml(site.authgate.url)}",
        "                          cluster: authgate_decisions",
        "                          timeout: 5s",
        f"                        path_prefix: {ENVOY_PREFIX}",
        "                        authorization_request:",
        "                          # what authgate reads (method, path and Host always go)",
        "                          allowed_headers:",
        "                            patterns:",
        *_patterns(asked, "                              "),
        "                        authorization_response:",
        "                          # authgate's values replace the client's",
        "                          allowed_upstream_headers:",
        "                            patterns:",
        *_patterns(upstream, "                              "),
        "                          # a denial's fields, as authgate wrote them",
        "                          allowed_client_headers:",
        "                            patterns:",
        *_patterns(ANSWER_FIELDS, "                              "),
        "                  - name: envoy.filters.http.router",
        "                    typed_config:",
        '                      "@type": type.googleapis.com/'
        "envoy.extensions.filters.http.router.v3.Router",
        "  clusters:",
        *_cluster("authgate_decisions", site.authgate),
        *_cluster("authgate_backend", site.upstream),
    ]
    return "\n".join(out) + "\n"


def site(authgate: str, upstream: str, listen: str, policy: Policy | None = None) -> Site:
    """The addresses checked and the header lists of `policy`. Raises ValueError."""
    strip, fields = from_policy(policy)
    return Site(
        authgate=parse_address(authgate, "--authgate"),
        upstream=parse_address(upstream, "--upstream"),
        listen=parse_address(listen, "--listen"),
        strip=strip,
        check_fields=fields,
        policy=policy.file if policy is not None else "",
        cookies=tuple(sorted(policy.cookie_issuers))
        if policy is not None and not policy.forward_credentials
        else (),
        sessions=policy is not None and policy.login is not None,
    )


def nginx(authgate: str, upstream: str, listen: str, policy: Policy | None = None) -> str:
    """nginx's configuration: the upstreams, maps and server block that go inside
    `http { }` (nginx_main makes a whole file of it). Raises ValueError."""
    return _nginx(site(authgate, upstream, listen, policy))


def caddy(authgate: str, upstream: str, listen: str, policy: Policy | None = None) -> str:
    """A Caddyfile (`caddy run --config FILE --adapter caddyfile`): a snippet and
    the site block, no global options. Raises ValueError."""
    return _caddy(site(authgate, upstream, listen, policy))


def traefik(authgate: str, upstream: str, listen: str, policy: Policy | None = None) -> str:
    """Traefik's dynamic configuration (file provider); the static part is in
    its opening comment. Raises ValueError."""
    return _traefik(site(authgate, upstream, listen, policy))


def envoy(authgate: str, upstream: str, listen: str, policy: Policy | None = None) -> str:
    """An Envoy bootstrap (`envoy -c FILE`, v3 API). Raises ValueError."""
    return _envoy(site(authgate, upstream, listen, policy))


GENERATORS: dict[str, Callable[[str, str, str, Policy | None], str]] = {
    "nginx": nginx,
    "caddy": caddy,
    "traefik": traefik,
    "envoy": envoy,
}


def generate(
    kind: str, authgate: str, upstream: str, listen: str, policy: Policy | None = None
) -> str:
    """The configuration of proxy `kind` (one of KINDS). Raises ValueError."""
    make = GENERATORS.get(kind)
    if make is None:
        raise ValueError(f"unknown proxy {kind!r}: one of {', '.join(KINDS)}")
    return make(authgate, upstream, listen, policy)
