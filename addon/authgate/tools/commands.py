"""The policy tools on the command line: `authgate check`, `explain`, `test`
and `replay`. Each loads policies the way the gateway does (same errors,
file:line) and prints; the work is done by lint, explain, policytests and
replay. Exit codes: 0 fine, 1 warnings (`check --strict`) or failed tests,
2 errors (a policy that does not load, bad arguments, unreadable capture).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import secrets
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from authgate.core.credentials import hash_key
from authgate.core.decision import RequestView
from authgate.core.model import Policy
from authgate.policy.load import load_policy
from authgate.policy.marks import PolicyError
from authgate.policy.values import parse_duration
from authgate.runtime.jwks import refresh_sync
from authgate.runtime.process import exit_now
from authgate.runtime.stores import MemoryStore
from authgate.tools import demo
from authgate.tools.keys import demo_key_path, ensure_demo_keys, load_private_key, mint
from authgate.tools.lint import Finding, fill_ins, lint
from authgate.tools.policytests import load_cases
from authgate.tools.testcases import Case

OK, WARNINGS, ERRORS = 0, 1, 2


def policy_files(paths: Sequence[str]) -> list[str]:
    """Policy paths, in order, once each. A `NAME.tests.yaml` stands for the
    policy beside it, so `authgate test policies/*.yaml` does the right thing."""
    out: list[str] = []
    for path in paths:
        p = Path(path)
        if p.name.endswith(".tests.yaml"):
            path = str(p.with_name(p.name.removesuffix(".tests.yaml") + ".yaml"))
        if path not in out:
            out.append(path)
    return out


def _load(path: str) -> tuple[Policy, tuple[Case, ...]]:
    """A policy and all its test cases (so errors in either show)."""
    policy = load_policy(path)
    return policy, load_cases(policy)


def _with_keys(policy: Policy, command: str) -> Policy:
    """Fetch the keys of issuers whose keys come from a JWKS address or
    discovery, as the gateway does at start (same timeouts); say so when a
    fetch fails (the requests needing those keys are then judged 503)."""
    for issuer, remote in policy.remote_keys:
        refresh_sync(remote)
        if not remote.loaded:
            print(
                f"authgate {command}: cannot fetch the keys of {issuer}: "
                f"{remote.last_error}; its tokens are judged 503 keys_unavailable",
                file=sys.stderr,
            )
    return policy


def _introspect(policy: Policy, request: RequestView, now: float) -> None:
    """Ask the issuer about an opaque token the request carries, as the
    gateway would (once, now); say so when it cannot answer (the request is
    then judged 503 introspection_unavailable)."""
    from authgate.core.decision import Prepared, prepare
    from authgate.core.introspection import Introspect
    from authgate.runtime.introspection import introspect_sync

    prepared = prepare(policy, request, now, MemoryStore(), consume=False)
    if isinstance(prepared, Prepared) and isinstance(prepared.work, Introspect):
        problem = introspect_sync(prepared.work.issuer, prepared.work.token, now)
        if problem is not None:
            print(
                f"authgate explain: cannot introspect the token at "
                f"{prepared.work.issuer.issuer}: {problem}; it is judged 503 "
                "introspection_unavailable",
                file=sys.stderr,
            )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def check(paths: Sequence[str], *, strict: bool = False, fmt: str = "text",
          listen: str | None = None) -> int:  # fmt: skip
    findings: list[Finding] = []
    summaries: list[str] = []
    for path in policy_files(paths):
        try:
            policy, cases = _load(path)
        except PolicyError as e:
            findings.extend(Finding(p.file, p.line, "invalid", p.message, "error") for p in e.all())
            summaries.append(f"{path}: does not load")
            continue
        placeholders = [
            f
            for file in dict.fromkeys([policy.file, *(case.file for case in cases)])
            for f in fill_ins(file, Path(file).read_text(encoding="utf-8"))
        ]
        found = lint(policy, listen)
        findings.extend(sorted([*found, *placeholders], key=lambda f: (f.file, f.line or 0)))
        about = f"{_plural(len(policy.rules), 'rule')}, {_plural(len(cases), 'test')}"
        if placeholders:
            summaries.append(f"{path}: {len(placeholders)} FILL-IN left ({about})")
        elif found:
            summaries.append(f"{path}: {_plural(len(found), 'warning')} ({about})")
        else:
            summaries.append(f"{path}: ok ({about})")
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    code = ERRORS if errors else (WARNINGS if warnings and strict else OK)
    if fmt == "json":
        out = {
            "findings": [f.as_dict() for f in findings],
            "errors": errors,
            "warnings": warnings,
            "exit": code,
        }
        print(json.dumps(out, indent=2))
    else:
        for f in findings:
            print(str(f))
        for line in summaries:
            print(line)
    return code


def _error(command: str, message: str) -> int:
    print(f"authgate {command}: {message}", file=sys.stderr)
    return ERRORS


def explain_command(args: argparse.Namespace) -> int:
    from authgate.core.explanation import explain
    from authgate.tools.explain import request_from_args
    from authgate.tools.replay import parse_at

    try:
        policy = _with_keys(load_policy(args.policy), "explain")
    except PolicyError as e:
        return _error("explain", str(e))
    try:
        at = parse_at(args.at) if args.at else None
        if at == "capture":
            raise ValueError("'capture' is for replay; give an ISO 8601 time")
        request = request_from_args(args.method, args.url, args.headers, ip=args.ip,
                                    peer=args.peer, token=args.token)  # fmt: skip
    except ValueError as e:
        return _error("explain", str(e))
    now = time.time() if at is None else float(at)
    _introspect(policy, request, now)
    told = explain(policy, request, now, MemoryStore())
    if args.json:
        print(json.dumps(told.as_dict(), indent=2))
    else:
        print(told.text(), end="")
    return OK


def test(paths: Sequence[str], *, strict: bool = False, verbose: bool = False,
         coverage: bool = False, min_coverage: float | None = None,
         as_json: bool = False) -> int:  # fmt: skip
    """`min_coverage`: each policy's branch coverage must reach it (implies
    `coverage`); `as_json`: one JSON document instead of the text."""
    from authgate.tools import coverage as cov
    from authgate.tools.policytests import format_report, run_policy

    code = OK
    documents: list[dict[str, object]] = []
    for path in policy_files(paths):
        try:
            policy, cases = _load(path)
        except PolicyError as e:
            print(f"authgate test: {e}", file=sys.stderr)
            documents.append({"policy": path, "error": str(e)})
            code = ERRORS
            continue
        measured = None
        if coverage or min_coverage is not None:
            report, measured = cov.measure(policy, cases)
        else:
            report = run_policy(policy, cases)
        failed = bool(report.failed) or (strict and (not report.outcomes or report.uncovered))
        least = min_coverage
        below = measured is not None and least is not None and measured.percent < least
        if as_json:
            documents.append(cov.as_json(report, measured))
        else:
            print(format_report(report, verbose), end="")
            if strict and not report.outcomes:
                print(f"{path}: --strict: the policy has no tests")
            if measured is not None:
                print(cov.format_coverage(measured), end="")
            if below and measured is not None:
                print(f"{path}: branch coverage {measured.percent:.1f}% is below "
                      f"--min-coverage {min_coverage:g}%")  # fmt: skip
        if (failed or below) and code == OK:
            code = WARNINGS
    if as_json:
        print(json.dumps({"policies": documents, "min_coverage": min_coverage, "exit": code},
                         indent=2))  # fmt: skip
    return code


def replay_command(args: argparse.Namespace) -> int:
    from authgate.tools import replay as r

    try:
        policy = _with_keys(load_policy(args.policy), "replay")
        old = _with_keys(load_policy(args.against), "replay") if args.against else None
    except PolicyError as e:
        return _error("replay", str(e))
    try:
        at = r.parse_at(args.at)
        records = r.read_capture(args.capture, args.peer)
    except ValueError as e:
        return _error("replay", str(e))
    when = "as of now" if at is None else (
        "as of each request's recorded time" if at == "capture"
        else f"as of {args.at}")  # fmt: skip
    new_decisions = r.judge_all(policy, records, at)
    if old is None:
        summary = r.report(records, new_decisions)
        if args.format == "json":
            print(json.dumps(summary, indent=2))
        else:
            print(f"{args.capture}: {len(records)} requests judged by {args.policy} {when}")
            print(r.format_report(summary, new_decisions), end="")
        return OK
    old_decisions = r.judge_all(old, records, at)
    changes = r.report_changes(records, old_decisions, new_decisions)
    if args.format == "json":
        out = {"requests": len(records), "changes": r.changes_as_dict(changes)}
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.capture}: {args.against} → {args.policy}, {when}")
        print(r.format_changes(changes, len(records), new_decisions), end="")
    return OK


def check_command(args: argparse.Namespace) -> int:
    return check(args.policies, strict=args.strict, fmt=args.format, listen=args.listen)


def test_command(args: argparse.Namespace) -> int:
    least = args.min_coverage
    if least is not None and not 0 <= least <= 100:
        return _error("test", f"--min-coverage is a percentage from 0 to 100, not {least:g}")
    return test(args.policies, strict=args.strict, verbose=args.verbose,
                coverage=args.coverage, min_coverage=least, as_json=args.json)  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    if not args.upstream.startswith(("http://", "https://")):
        print(
            f"authgate run: --upstream {args.upstream} needs a scheme: "
            f"--upstream http://{args.upstream} (or https://)",
            file=sys.stderr,
        )
        return 2
    from authgate.house import workers

    count = _processes(args, "run")
    if count is None:
        return 2
    if args.tls_client_ca and not args.tls_cert:
        print("authgate run: --tls-client-ca needs --tls-cert and --tls-key (client "
              "certificates come with HTTPS)", file=sys.stderr)  # fmt: skip
        return 2
    web = args.web_listen if args.web else None
    if count > 1:
        if web:
            print("authgate run: --web shows one process's flows; use it without --workers",
                  file=sys.stderr)  # fmt: skip
            return 2
        memory = args.store in ("", "memory")
        supervisor = workers.Supervisor(
            _worker_argv(args), count, admin=args.admin, memory_store=memory
        )
        return supervisor.run()
    sets = [*args.set, f"authgate_store={args.store}"]
    if args.admin:
        sets.append(f"authgate_admin={args.admin}")
    if args.otlp:
        sets.append(f"authgate_otlp={args.otlp}")
    from authgate.proxy.runner import serve  # mitmproxy: only for the commands that proxy

    exit_now(
        serve(
            args.policy,
            args.upstream,
            args.listen,
            sets,
            web=web,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            upstream_ca=args.upstream_ca,
            tls_client_ca=args.tls_client_ca,
        )
    )


def _processes(args: argparse.Namespace, command: str) -> int | None:
    """The number of processes `--workers` asks for, after checking the options
    `run` and `serve` share (TLS files in pairs, the store's URL, the collector's); None (and
    the reason on stderr) when they are wrong."""
    from authgate.house import workers

    if bool(args.tls_cert) != bool(args.tls_key):
        given, missing = ("--tls-cert", "--tls-key")
        if args.tls_key:
            given, missing = missing, given
        print(f"authgate {command}: {given} needs {missing} too (HTTPS takes both)",
              file=sys.stderr)  # fmt: skip
        return None
    try:
        count = workers.worker_count(args.workers)
        if args.store not in ("", "memory"):
            from authgate.runtime.redis_store import parse_store_url

            parse_store_url(args.store)
        if args.otlp:
            from authgate.runtime.tracing import check_tracing

            check_tracing(args.otlp)
    except ValueError as e:
        print(f"authgate {command}: {e}", file=sys.stderr)
        return None
    return count


def cmd_serve(args: argparse.Namespace) -> int:
    """`authgate serve`: the decision service (one process, or --workers N)."""
    from authgate.house import workers
    from authgate.service.server import serve as serve_decisions

    count = _processes(args, "serve")
    if count is None:
        return 2
    if count > 1:
        memory = args.store in ("", "memory")
        supervisor = workers.Supervisor(
            _service_worker_argv(args), count, admin=args.admin, memory_store=memory,
            command="serve",
        )  # fmt: skip
        return supervisor.run()
    sets = [*args.set, f"authgate_otlp={args.otlp}"] if args.otlp else args.set
    exit_now(
        serve_decisions(
            args.policy,
            args.listen,
            sets,
            store=args.store,
            admin=args.admin,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    )


def _service_worker_argv(args: argparse.Namespace) -> list[str]:
    """A worker's `authgate serve` arguments: the supervisor's, less what it
    does for all of them (--workers, --admin)."""
    argv = ["--policy", args.policy, "--listen", args.listen, "--store", args.store]
    for name in ("tls_cert", "tls_key", "otlp"):
        if getattr(args, name, None):
            argv += ["--" + name.replace("_", "-"), getattr(args, name)]
    for item in args.set:
        argv += ["--set", item]
    return argv


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """A worker's `authgate run` arguments: the supervisor's, less what it
    does for all of them (--workers, --admin)."""
    argv = ["--policy", args.policy, "--listen", args.listen, "--upstream", args.upstream]
    argv += ["--store", args.store]
    for name in ("tls_cert", "tls_key", "upstream_ca", "tls_client_ca", "otlp"):
        if getattr(args, name, None):
            argv += ["--" + name.replace("_", "-"), getattr(args, name)]
    for item in args.set:
        argv += ["--set", item]
    return argv


def _cannot_bind(address: str) -> int | None:
    """The errno of listening on HOST:PORT now (bound as the servers bind, with
    SO_REUSEADDR), or None when it can be listened on."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as e:
            return e.errno
    return None


def _move(args: argparse.Namespace) -> str:
    """What to do when the demo's ports are taken, with free ones to take."""

    def free(address: str, step: int) -> str:
        host, _, port = address.rpartition(":")
        ports = range(int(port) + step, min(int(port) + 20 * step, 65536), step)
        tries = [f"{host}:{p}" for p in ports]
        return next((a for a in tries if _cannot_bind(a) is None), tries[0] if tries else address)

    listen, backend = free(args.listen, 10), free(args.backend, 1)
    return (
        "is another `make run` (or `authgate demo`) running? Stop it, or run this one "
        f'beside it: make run ARGS="--listen {listen} --backend {backend}"'
    )


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo's log is for decisions: keep mitmproxy's per-connection lines out.
    logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)

    policy = Path(args.policy)
    keys_dir = demo.prepare(policy)
    for what, address in (("the gateway", args.listen), ("the demo backend", args.backend)):
        if _cannot_bind(address) == errno.EADDRINUSE:
            print(f"authgate demo: {address} ({what}) is already in use: {_move(args)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    backend_host, _, backend_port = args.backend.rpartition(":")
    try:
        server = demo.start_backend(backend_host.strip("[]"), int(backend_port))
    except OSError as e:
        more = f": {_move(args)}" if e.errno == errno.EADDRINUSE else ""
        print(
            f"authgate demo: cannot start the demo backend on {args.backend}: {e.strerror}{more}",
            file=sys.stderr,
        )
        return 2
    idp = None
    issuer = None
    code: int | None = None
    if args.idp:
        idp_host, _, idp_port = args.idp.rpartition(":")
        try:
            idp = demo.start_idp(keys_dir, idp_host.strip("[]"), int(idp_port))
        except (OSError, ValueError) as e:
            server.shutdown()
            print(
                f"authgate demo: cannot start the demo provider on {args.idp}: {e}", file=sys.stderr
            )
            return 2
        issuer = f"http://{args.idp}{demo.IDP_REALM}"
    from authgate.proxy.runner import serve

    try:
        base = f"http://{args.listen}"
        code = serve(
            str(policy),
            f"http://{args.backend}",
            args.listen,
            ["authgate_log=-", *args.set],  # the demo shows each decision
            on_ready=demo.banner(base, keys_dir, policy, issuer),
        )
    finally:
        server.shutdown()
        if idp is not None:
            idp.shutdown()
        if code is not None:
            exit_now(code)


def cmd_token(args: argparse.Namespace) -> int:
    path = Path(args.key) if args.key else demo_key_path()
    try:
        key = load_private_key(path)
    except (OSError, ValueError) as e:
        fix = "" if args.key else (
            "; make the demo key with `authgate demo-keys` (`make install` does), or give "
            "--key FILE")  # fmt: skip
        print(f"authgate token: cannot load the private key {path}: {e}{fix}", file=sys.stderr)
        return 2
    try:
        ttl = parse_duration(args.ttl, signed=True)
    except ValueError as e:
        print(f"authgate token: --ttl: {e}", file=sys.stderr)
        return 2
    claims = {}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"authgate token: --claim {item!r} must be NAME=VALUE", file=sys.stderr)
            return 2
        claims[name] = value
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
            headers={"typ": args.typ} if args.typ else None,
            extra=claims,
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


def cmd_demo_keys(args: argparse.Namespace) -> int:
    private = ensure_demo_keys(Path(args.folder))
    print(f"authgate: demo keys in {private.parent} (private key {private.name}, jwks.json)")
    return 0


def cmd_import_openapi(args: argparse.Namespace) -> int:
    from authgate.tools import openapi

    return openapi.main(args.spec, args.output)


def cmd_learn(args: argparse.Namespace) -> int:
    from authgate.tools import learn

    try:
        base = _with_keys(load_policy(args.policy), "learn")
    except PolicyError as e:
        return _error("learn", str(e))
    return learn.main(base, args)


def cmd_config(args: argparse.Namespace) -> int:
    """`authgate config PROXY`: a proxy's configuration for the decision service."""
    from authgate.tools import proxyconfig

    try:
        policy = load_policy(args.policy) if args.policy else None
    except PolicyError as e:
        return _error("config", str(e))
    try:
        text = proxyconfig.generate(args.proxy, args.authgate, args.upstream, args.listen, policy)
    except ValueError as e:
        return _error("config", str(e))
    sys.stdout.write(text)
    return OK


def cmd_denials(args: argparse.Namespace) -> int:
    """`authgate denials LOG...`: findings from decision logs. 0 none, 1 some,
    2 errors."""
    from authgate.tools import denials

    try:
        window = parse_duration(args.window)
        since = denials.parse_since(args.since, time.time()) if args.since else None
    except ValueError as e:
        return _error("denials", str(e))
    counts = {
        "--probe-paths": args.probe_paths,
        "--guess-credentials": args.guess_credentials,
        "--rule-callers": args.rule_callers,
    }
    for option, value in counts.items():
        if value < 1:
            return _error("denials", f"{option} is a count of at least 1, not {value}")
    if not 0 < args.rule_refused <= 100:
        return _error("denials", f"--rule-refused is a percentage above 0, at most 100, not "
                                 f"{args.rule_refused:g}")  # fmt: skip
    if window <= 0:
        return _error("denials", f"--window must be longer than 0, not {args.window!r}")
    try:
        policy = load_policy(args.policy) if args.policy else None
    except PolicyError as e:
        return _error("denials", str(e))
    thresholds = denials.Thresholds(
        window, args.probe_paths, args.guess_credentials, args.rule_callers, args.rule_refused
    )
    try:
        report = denials.analyze(args.logs, thresholds, since=since, policy=policy)
    except OSError as e:
        return _error("denials", f"cannot read {e.filename or 'a log'}: {e.strerror or e}")
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.text(), end="")
    return WARNINGS if report.findings else OK
