"""The `authgate` command: run, demo, token, and the policy tools check,
explain, test and replay."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .credentials import hash_key
from .keys import DEMO_AUDIENCE, DEMO_ISSUER, DEMO_KID, load_private_key, mint
from .policy import parse_duration

DEFAULT_POLICY = "policies/example.yaml"


def _serve(
    policy: str,
    upstream: str,
    listen: str,
    sets: Sequence[str],
    on_ready: str | None = None,
    web: str | None = None,
) -> int:
    from mitmproxy import exceptions

    from . import runner

    async def main() -> int:
        logging.getLogger().setLevel(logging.INFO)  # mitmproxy's termlog filters by verbosity

        def ready(port: int) -> None:
            if on_ready:
                print(on_ready, flush=True)

        try:
            m = await runner.build(policy, upstream, listen, sets, ready=ready, web=web)
        except exceptions.OptionsError as e:
            print(str(e), file=sys.stderr)  # already "authgate: FILE:LINE: problem"
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, m.shutdown)
        await m.run()
        return 0

    return asyncio.run(main())


def cmd_run(args: argparse.Namespace) -> int:
    web = args.web_listen if args.web else None
    if web:
        print(f"authgate: mitmweb on http://{web}/ (each flow shows its decision)", flush=True)
    return _serve(args.policy, args.upstream, args.listen, args.set, web=web)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    # The demo's log is for decisions: keep mitmproxy's per-connection lines out.
    logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)

    policy = Path(args.policy)
    keys_dir = demo.prepare(policy)
    backend_host, _, backend_port = args.backend.rpartition(":")
    try:
        server = demo.start_backend(backend_host, int(backend_port))
    except OSError as e:
        print(
            f"authgate demo: cannot start the demo backend on {args.backend}: {e.strerror}",
            file=sys.stderr,
        )
        return 2
    try:
        base = f"http://{args.listen}"
        return _serve(
            str(policy),
            f"http://{args.backend}",
            args.listen,
            args.set,
            on_ready=demo.banner(base, keys_dir),
        )
    finally:
        server.shutdown()


def cmd_token(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(Path(args.key))
    except (OSError, ValueError) as e:
        print(f"authgate token: cannot load the private key {args.key}: {e}", file=sys.stderr)
        return 2
    try:
        ttl = parse_duration(args.ttl.lstrip("-"))
    except ValueError as e:
        print(f"authgate token: --ttl: {e}", file=sys.stderr)
        return 2
    if args.ttl.startswith("-"):
        ttl = -ttl
    print(
        mint(
            key,
            sub=args.sub,
            roles=args.role,
            scopes=args.scope,
            ttl=ttl,
            iss=args.iss,
            aud=args.aud,
            kid=args.kid or None,
            alg=args.alg,
        )
    )
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    if args.generate:
        key = secrets.token_urlsafe(32)
        print(f"key:    {key}", file=sys.stderr)
        print("Give the key to its client; put only the digest in the policy:", file=sys.stderr)
    else:
        key = sys.stdin.readline().rstrip("\r\n")
        if not key:
            print("authgate hash-key: no key on standard input", file=sys.stderr)
            return 2
    print(hash_key(key))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .tools import check

    return check(args.policies, strict=args.strict, fmt=args.format, listen=args.listen)


def cmd_explain(args: argparse.Namespace) -> int:
    from .tools import explain_command

    return explain_command(args)


def cmd_test(args: argparse.Namespace) -> int:
    from .tools import test

    return test(args.policies, strict=args.strict, verbose=args.verbose)


def cmd_replay(args: argparse.Namespace) -> int:
    from .tools import replay_command

    return replay_command(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="authgate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def gateway_options(sp: argparse.ArgumentParser, listen: str) -> None:
        sp.add_argument("--policy", default=DEFAULT_POLICY, help="policy file (YAML)")
        sp.add_argument("--listen", default=listen, help=f"HOST:PORT to listen on ({listen})")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="a mitmproxy option, as with mitmdump --set (repeatable)",
        )

    run = sub.add_parser("run", help="run the gateway in front of a backend")
    gateway_options(run, "127.0.0.1:8080")
    run.add_argument("--upstream", required=True, help="the backend, e.g. http://127.0.0.1:9000")
    run.add_argument("--web", action="store_true", help="also serve the mitmweb UI")
    run.add_argument(
        "--web-listen",
        default="127.0.0.1:8081",
        metavar="HOST:PORT",
        help="where the mitmweb UI listens (127.0.0.1:8081)",
    )
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="the gateway and a demo backend (what `make run` starts)")
    gateway_options(demo, "127.0.0.1:8080")
    demo.add_argument("--backend", default="127.0.0.1:9000", help="HOST:PORT of the demo backend")
    demo.set_defaults(func=cmd_demo)

    tok = sub.add_parser("token", help="mint a signed JWT (defaults: the demo key and issuer)")
    tok.add_argument("--key", default="policies/keys/demo-private.pem", help="private key (PEM)")
    tok.add_argument("--sub", required=True, help="subject")
    tok.add_argument("--role", action="append", default=[], help="a role (repeatable)")
    tok.add_argument("--scope", action="append", default=[], help="a scope (repeatable)")
    tok.add_argument("--ttl", default="1h", help="lifetime: 30s, 5m, 1h; negative for expired")
    tok.add_argument("--iss", default=DEMO_ISSUER, help=f"issuer ({DEMO_ISSUER})")
    tok.add_argument("--aud", default=DEMO_AUDIENCE, help=f"audience ({DEMO_AUDIENCE})")
    tok.add_argument("--kid", default=DEMO_KID, help=f"key id ({DEMO_KID}); empty for none")
    tok.add_argument("--alg", default="RS256", help="algorithm (RS256)")
    tok.set_defaults(func=cmd_token)

    hk = sub.add_parser(
        "hash-key", help="print the SHA-256 digest of an API key read from standard input"
    )
    hk.add_argument("--generate", action="store_true", help="make a new random key instead")
    hk.set_defaults(func=cmd_hash_key)

    chk = sub.add_parser(
        "check", help="validate policies and warn about rules that may not mean what they say"
    )
    chk.add_argument("policies", nargs="+", metavar="POLICY", help="policy files (YAML)")
    chk.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
    chk.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    chk.add_argument(
        "--listen",
        metavar="ADDR",
        help="the gateway's listener (HOST:PORT or http(s)://HOST:PORT), to check "
        "credentials sent in clear",
    )
    chk.set_defaults(func=cmd_check)

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
    exp.set_defaults(func=cmd_explain)

    tst = sub.add_parser("test", help="run the test cases of policies")
    tst.add_argument("policies", nargs="+", metavar="POLICY", help="policy files (YAML)")
    tst.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")
    tst.add_argument(
        "--strict", action="store_true", help="also fail on rules no test reaches, or no tests"
    )
    tst.set_defaults(func=cmd_test)

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
    rep.set_defaults(func=cmd_replay)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
