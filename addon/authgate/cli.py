"""The `authgate` command: argument parsing and dispatch, nothing else.

run and demo serve the gateway; token and hash-key make credentials; check,
explain, test and replay are the policy tools, denials reads decision logs
(authgate.tools).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _lazy(name: str) -> Callable[[argparse.Namespace], int]:
    """Dispatch to authgate.tools.commands.NAME, imported only when used (so
    that `authgate --help` and `authgate token` do not load mitmproxy)."""

    def call(args: argparse.Namespace) -> int:
        from authgate.tools import commands

        code: int = getattr(commands, name)(args)
        return code

    return call


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\Z")


def host_port(text: str) -> str:
    """A listening address, `HOST:PORT`, checked and written out in full: a
    port alone (`8080` or `:8080`) is 127.0.0.1, loopback, so that listening
    beyond this machine always takes an address (`0.0.0.0:8080` for every
    IPv4 interface, `[::]:8080` for every IPv6 one, or a name or address of
    this machine's). An IPv6 address is bracketed. Raises ArgumentTypeError."""
    text = text.strip()
    host, _, port = text.rpartition(":")
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or a port, not {text!r}")
    if not host:
        return f"127.0.0.1:{int(port)}"
    if host.startswith("[") and host.endswith("]"):
        try:
            if ipaddress.ip_address(host[1:-1]).version == 6:
                return f"{host}:{int(port)}"
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{host} in {text!r} is not an IPv6 address")
    if ":" in host:
        raise argparse.ArgumentTypeError(
            f"write an IPv6 address in brackets, as in [::1]:8080, not {text!r}"
        )
    if not _HOSTNAME.match(host):
        raise argparse.ArgumentTypeError(
            f"{host!r} in {text!r} is not a host name or address (every interface: "
            f"0.0.0.0:{int(port)} or [::]:{int(port)})"
        )
    return f"{host}:{int(port)}"


def _listener(text: str) -> str:
    """`check --listen`: a URL as given, or HOST:PORT as `run --listen` reads it."""
    return text.strip() if "://" in text else host_port(text)


DESCRIPTION = """An auth gateway for HTTP APIs, run by mitmproxy: each request is judged
by a policy (YAML) before it reaches the backend. `make run` starts the demo;
`authgate COMMAND --help` tells about each command."""


class _Version(argparse.Action):
    """`--version`: authgate's version and mitmproxy's, read from the installed
    packages (so without loading mitmproxy)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        def of(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        print(f"authgate {of('authgate')} (mitmproxy {of('mitmproxy')})")
        parser.exit()


def _describe(subs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Each command's own --help opens with the line `authgate --help` shows for
    it, unless it has a longer description."""
    for shown in subs._choices_actions:
        command = subs.choices[shown.dest]
        if command.description is None and shown.help:
            command.description = shown.help[0].upper() + shown.help[1:] + "."


def parser() -> argparse.ArgumentParser:
    from authgate.tools.keys import DEMO_AUDIENCE, DEMO_ISSUER, DEMO_KID  # (imports jwt)

    p = argparse.ArgumentParser(prog="authgate", description=DESCRIPTION)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)

    def gateway_options(
        sp: argparse.ArgumentParser,
        listen: str,
        policy: str | None,
        sets: str = "a mitmproxy option, as with mitmdump --set (repeatable)",
    ) -> None:
        if policy is None:
            sp.add_argument("--policy", required=True, help="policy file (YAML); required")
        else:
            sp.add_argument("--policy", default=policy, help=f"policy file (YAML; {policy})")
        sp.add_argument(
            "--listen",
            default=listen,
            type=host_port,
            metavar="HOST:PORT",
            help=f"where to listen ({listen}); a port alone is 127.0.0.1; "
            "0.0.0.0:PORT or [::]:PORT for every interface",
        )
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help=sets,
        )

    def production_options(sp: argparse.ArgumentParser, what: str) -> None:
        """What `run` and `serve` share beyond gateway_options."""
        sp.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS only, with this PEM cert")
        sp.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
        sp.add_argument(
            "--workers",
            default="1",
            metavar="N",
            help=f"{what} processes on the listen address (1; auto: one per core)",
        )
        sp.add_argument(
            "--store",
            default="memory",
            metavar="URL",
            help="where rate-limit counts live: memory, or redis://HOST:PORT/DB (rediss:// "
            "for TLS; password in the URL or AUTHGATE_REDIS_PASSWORD) to share them (memory)",
        )
        sp.add_argument(
            "--admin",
            type=host_port,
            metavar="HOST:PORT",
            help="serve /live, /ready, /metrics and /status there (off; e.g. 9901, which "
            "is 127.0.0.1:9901)",
        )
        sp.add_argument(
            "--otlp",
            metavar="URL",
            help="send OpenTelemetry traces to this OTLP/HTTP collector, e.g. "
            "http://127.0.0.1:4318 (off; needs pip install 'authgate[otel]')",
        )

    run = sub.add_parser("run", help="run the gateway in front of a backend")
    gateway_options(run, "127.0.0.1:8080", None)
    run.add_argument("--upstream", required=True, help="the backend, e.g. http://127.0.0.1:9000")
    production_options(run, "gateway")
    run.add_argument(
        "--upstream-ca", metavar="FILE", help="verify an https:// upstream against this CA (PEM)"
    )
    run.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="ask clients for a certificate issued under this CA (PEM; mutual TLS, with "
        "--tls-cert; the policy's authn.mtls says whether it is required)",
    )
    run.add_argument("--web", action="store_true", help="also serve the mitmweb UI")
    run.add_argument(
        "--web-listen",
        default="127.0.0.1:8081",
        type=host_port,
        metavar="HOST:PORT",
        help="where the mitmweb UI listens (127.0.0.1:8081)",
    )
    run.set_defaults(func=_lazy("cmd_run"))

    srv = sub.add_parser(
        "serve",
        help="the decision service: the policy for nginx, Envoy, Caddy and Traefik",
        description="Answer forward-auth check requests (nginx auth_request, Envoy "
        "ext_authz, Caddy forward_auth, Traefik forwardAuth) with the policy's decisions. "
        "See docs/decision-service.md.",
    )
    gateway_options(
        srv,
        "127.0.0.1:9191",
        None,
        "authgate_log, authgate_mode, authgate_watch, authgate_store_timeout, "
        "authgate_metrics, authgate_header_timeout, authgate_idle_timeout or "
        "authgate_otlp, as for "
        "`authgate run` (repeatable)",
    )
    production_options(srv, "service")
    srv.set_defaults(func=_lazy("cmd_serve"))

    cfg = sub.add_parser(
        "config",
        help="print a proxy's configuration for the decision service (nginx, caddy, ...)",
        description="Print a working configuration that puts nginx, Caddy, Traefik or Envoy "
        "in front of a backend, every request judged by `authgate serve`. See "
        "docs/decision-service.md.",
    )
    cfg.add_argument("proxy", choices=["nginx", "caddy", "traefik", "envoy"], help="the proxy")
    cfg.add_argument(
        "--authgate",
        default="127.0.0.1:9191",
        metavar="HOST:PORT",
        help="where `authgate serve` listens (127.0.0.1:9191); a port alone is 127.0.0.1",
    )
    cfg.add_argument(
        "--upstream", required=True, metavar="URL", help="the backend, e.g. http://127.0.0.1:9000"
    )
    cfg.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        type=host_port,
        metavar="HOST:PORT",
        help="where the proxy listens (127.0.0.1:8080); a port alone is 127.0.0.1",
    )
    cfg.add_argument(
        "--policy",
        metavar="POLICY",
        help="the policy authgate serves: the proxy also removes the fields it strips "
        "(default: the default strip_headers list)",
    )
    cfg.set_defaults(func=_lazy("cmd_config"))

    demo = sub.add_parser("demo", help="the gateway and a demo backend (what `make run` starts)")
    gateway_options(demo, "127.0.0.1:8080", "policies/example.yaml")
    demo.add_argument(
        "--backend",
        default="127.0.0.1:9000",
        type=host_port,
        metavar="HOST:PORT",
        help="where the demo backend listens (default: 127.0.0.1:9000)",
    )
    demo.add_argument(
        "--idp",
        nargs="?",
        const="127.0.0.1:8999",
        type=host_port,
        metavar="HOST:PORT",
        help="also serve a demo identity provider (JWKS and discovery) for "
        "policies/identity-provider.yaml (127.0.0.1:8999)",
    )
    demo.set_defaults(func=_lazy("cmd_demo"))

    tok = sub.add_parser("token", help="mint a signed JWT (defaults: the demo key and issuer)")
    tok.add_argument(
        "--key",
        metavar="FILE",
        help="private key (PEM); default: policies/keys/demo-private.pem here, else in "
        "the authgate project",
    )
    tok.add_argument("--sub", required=True, help="subject")
    tok.add_argument("--role", action="append", default=[], help="a role (repeatable)")
    tok.add_argument("--scope", action="append", default=[], help="a scope (repeatable)")
    tok.add_argument(
        "--ttl", default="1h", help="lifetime: 30s, 5m, 1h; negative for expired (--ttl -1h)"
    )
    tok.add_argument("--iss", default=DEMO_ISSUER, help=f"issuer ({DEMO_ISSUER})")
    tok.add_argument("--aud", default=DEMO_AUDIENCE, help=f"audience ({DEMO_AUDIENCE})")
    tok.add_argument("--kid", default=DEMO_KID, help=f"key id ({DEMO_KID}); empty for none")
    tok.add_argument("--alg", default="RS256", help="algorithm (RS256)")
    tok.add_argument("--typ", help="the `typ` header, e.g. at+jwt (RFC 9068 access tokens)")
    tok.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another claim, a string (repeatable), e.g. client_id=web",
    )
    tok.set_defaults(func=_lazy("cmd_token"))

    dk = sub.add_parser("demo-keys", help="make the demo key pair (what `make install` runs)")
    dk.add_argument("folder", nargs="?", default="policies/keys", help="(policies/keys)")
    dk.set_defaults(func=_lazy("cmd_demo_keys"))

    hk = sub.add_parser(
        "hash-key", help="print the SHA-256 digest of an API key read from standard input"
    )
    hk.add_argument("--generate", action="store_true", help="make a new random key instead")
    hk.set_defaults(func=_lazy("cmd_hash_key"))

    chk = sub.add_parser(
        "check", help="validate policies and warn about rules that may not mean what they say"
    )
    chk.add_argument("policies", nargs="+", metavar="POLICY", help="policy files (YAML)")
    chk.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
    chk.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    chk.add_argument(
        "--listen",
        type=_listener,
        metavar="ADDR",
        help="the gateway's listener (HOST:PORT or http(s)://HOST:PORT), to check "
        "credentials sent in clear",
    )
    chk.set_defaults(func=_lazy("check_command"))

    exp = sub.add_parser("explain", help="how the gateway would decide one request, step by step")
    exp.add_argument("policy", metavar="POLICY", help="policy file (YAML)")
    exp.add_argument("method", metavar="METHOD", help="GET, POST, ...")
    exp.add_argument("url", metavar="URL", help="a path (/api/x?q=1) or an absolute URL")
    exp.add_argument(
        "-H", dest="headers", action="append", default=[], metavar="'Name: value'",
        help="a request header (repeatable)",
    )  # fmt: skip
    exp.add_argument(
        "--ip", help="the client's address (with --peer: sent in X-Forwarded-For by that proxy)"
    )
    exp.add_argument("--peer", help="the socket peer (default: --ip, else 127.0.0.1)")
    exp.add_argument("--token", metavar="JWT", help="shorthand for -H 'Authorization: Bearer JWT'")
    exp.add_argument("--at", metavar="TIME", help="judge as of this ISO 8601 time (default: now)")
    exp.add_argument("--json", action="store_true", help="the decision as one JSON object")
    exp.set_defaults(func=_lazy("explain_command"))

    tst = sub.add_parser("test", help="run the test cases of policies")
    tst.add_argument("policies", nargs="+", metavar="POLICY", help="policy files (YAML)")
    tst.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")
    tst.add_argument(
        "--strict", action="store_true", help="also fail on rules no test reaches, or no tests"
    )
    tst.add_argument(
        "--coverage",
        action="store_true",
        help="report the rules and condition branches no test covers, with file:line",
    )
    tst.add_argument(
        "--min-coverage",
        type=float,
        metavar="PCT",
        help="fail (exit 1) when a policy's branch coverage is below PCT percent (implies "
        "--coverage)",
    )
    tst.add_argument("--json", action="store_true", help="the results as one JSON document")
    tst.set_defaults(func=_lazy("test_command"))

    rep = sub.add_parser("replay", help="what a policy would decide for recorded traffic")
    rep.add_argument("policy", metavar="POLICY", help="policy file (YAML)")
    rep.add_argument("capture", metavar="CAPTURE", help="mitmproxy flow file (-w) or HAR file")
    rep.add_argument(
        "--against", metavar="OLD_POLICY", help="report only the requests whose decision changes"
    )
    rep.add_argument(
        "--at",
        metavar="TIME",
        help="judge time-dependent checks (token expiry) as of this ISO 8601 time, or "
        "'capture' for each request's recorded time (default: now)",
    )
    rep.add_argument(
        "--peer", default="127.0.0.1", help="client address for HAR entries (127.0.0.1)"
    )
    rep.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    rep.set_defaults(func=_lazy("replay_command"))

    imp = sub.add_parser("import", help="write a starting policy from an API description")
    imp_sub = imp.add_subparsers(dest="source", required=True)
    oas = imp_sub.add_parser(
        "openapi", help="a policy and its tests from an OpenAPI 3.0/3.1 document (YAML or JSON)"
    )
    oas.add_argument("spec", metavar="SPEC", help="the OpenAPI document")
    oas.add_argument(
        "--output",
        metavar="FILE",
        help="write the policy here and its tests beside it (NAME.tests.yaml); "
        "default: the policy, tests included, on standard output",
    )
    oas.set_defaults(func=_lazy("cmd_import_openapi"))

    lrn = sub.add_parser("learn", help="propose a policy from recorded traffic (in report mode)")
    lrn.add_argument("capture", metavar="CAPTURE", help="mitmproxy flow file (-w) or HAR file")
    lrn.add_argument(
        "--policy", required=True, metavar="BASE",
        help="the base policy: its authn verifies the captured credentials; its rules are kept",
    )  # fmt: skip
    lrn.add_argument("--output", metavar="FILE", help="write the policy here (default: stdout)")
    lrn.add_argument(
        "--peer", default="127.0.0.1", help="client address for HAR entries (127.0.0.1)"
    )
    lrn.add_argument(
        "--max-literals", type=int, default=10, metavar="K",
        help="more distinct values than K at one path position make it a parameter (10)",
    )  # fmt: skip
    lrn.set_defaults(func=_lazy("cmd_learn"))

    den = sub.add_parser(
        "denials",
        help="findings from decision logs: refusing rules, probing, password guessing, ...",
        description="Read decision logs (authgate_log files; rotated and gzip-compressed "
        "ones too, in any order) and report what the denials say: rules that refuse most "
        "of their authenticated callers, callers probing many paths, addresses cycling "
        "credentials, hidden rules given away by a neighbour's 401/403, and what the "
        "report-mode rules would refuse. Each finding has its evidence and a suggestion. "
        "See docs/denials.md.",
        epilog="Exit status: 0 no findings, 1 findings, 2 errors (a log that cannot be "
        "read, a policy that does not load, bad arguments).",
    )
    den.add_argument("logs", nargs="+", metavar="LOG", help="decision logs (plain or .gz)")
    den.add_argument(
        "--policy", metavar="POLICY",
        help="the policy: rules' lines, hidden rules' patterns, report-mode rules",
    )  # fmt: skip
    den.add_argument("--json", action="store_true", help="the report as one JSON document")
    den.add_argument(
        "--since", metavar="WHEN",
        help="only entries of the last DURATION (30m, 2h, 1d) or since an ISO 8601 time",
    )  # fmt: skip
    den.add_argument(
        "--window", default="5m", metavar="DURATION",
        help="the sliding window of probing and guessing (5m)",
    )  # fmt: skip
    den.add_argument(
        "--probe-paths", type=int, default=10, metavar="N",
        help="probing: distinct paths refused to one caller within the window (10)",
    )  # fmt: skip
    den.add_argument(
        "--guess-credentials", type=int, default=10, metavar="N",
        help="guessing: distinct failed credentials from one address within the window (10)",
    )  # fmt: skip
    den.add_argument(
        "--rule-callers", type=int, default=3, metavar="N",
        help="refusing rule: authenticated callers the rule must have seen (3)",
    )  # fmt: skip
    den.add_argument(
        "--rule-refused", type=float, default=90.0, metavar="PCT",
        help="refusing rule: the percentage of them it refused, at least (90)",
    )  # fmt: skip
    den.set_defaults(func=_lazy("cmd_denials"))
    _describe(sub)
    _describe(imp_sub)
    return p


_NEGATIVE = re.compile(r"^-\d")


def _negative_values(argv: Sequence[str]) -> list[str]:
    """`--ttl -1h` as `--ttl=-1h`: argparse takes a value starting with '-' (and
    not a plain number) for an option, and refuses it as the value."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--ttl" and _NEGATIVE.match(arg):
            out[-1] = f"--ttl={arg}"
        else:
            out.append(arg)
    return out


def _start_compiling(argv: Sequence[str]) -> None:
    """`authgate run ... --policy FILE`: have the policy's block lists compile
    in a helper process from now on, while jwt and mitmproxy are imported
    (authgate.runtime.listhelper). Reads `--policy FILE` or `--policy=FILE`
    only; anything else (an abbreviation) means no helper, never a failure."""
    if not argv or argv[0] != "run":
        return
    for i, arg in enumerate(argv):
        if arg == "--policy" and i + 1 < len(argv):
            policy = argv[i + 1]
        elif arg.startswith("--policy="):
            policy = arg.removeprefix("--policy=")
        else:
            continue
        from authgate.runtime import listhelper

        listhelper.start(policy)
        return


def main(argv: Sequence[str] | None = None) -> int:
    words = _negative_values(sys.argv[1:] if argv is None else argv)
    _start_compiling(words)
    args = parser().parse_args(words)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
