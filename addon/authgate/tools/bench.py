"""`make bench`: what the core costs, measured (never asserted in tests).

Times `decide()` on the reference policy for a few kinds of request, and the
load of a generated one-million-entry block list; then the end-to-end part
under wrk (bench_e2e.py) and start-up (bench_startup.py).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from authgate.core.decision import Bans, RequestView, judge
from authgate.core.ipset import format_ip
from authgate.core.model import Ban, Policy
from authgate.policy.load import load_policy, parse_policy
from authgate.runtime.stores import MemoryStore
from authgate.tools.keys import ensure_demo_keys, load_private_key, mint


def _per_call(fn: Callable[[], object], seconds: float = 1.0) -> float:
    n = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn()
        n += 100
    return elapsed / n


def bench_decide(policy_path: Path) -> list[tuple[str, float]]:
    key = load_private_key(ensure_demo_keys(policy_path.parent / "keys"))
    policy = load_policy(policy_path)
    user = mint(key, sub="alice", roles=["user"])
    limiter = MemoryStore()
    now = time.time()

    def view(target: str, token: str | None = None, peer: str = "127.0.0.1") -> RequestView:
        headers = (("authorization", f"Bearer {token}"),) if token else ()
        return RequestView.build("GET", target, headers, peer)

    cases = {
        "public route, no token (200)": view("/health"),
        "no credentials (401)": view("/api/profile"),
        "valid RS256 token, first sight (200)": view("/api/profile", user),
        "valid RS256 token, seen before (200)": view("/api/profile", user),
        "valid token, wrong owner (403)": view("/api/users/bob", user),
        "unknown path (404)": view("/nothing/here"),
        "ambiguous path (400)": view("/api/admin%2Fx"),
    }
    results = []
    for name, request in cases.items():
        # A big per-ip quota would still run out in a tight loop: fresh limiter each time.
        first_sight = "first sight" in name

        def call(request: RequestView = request, first_sight: bool = first_sight) -> object:
            limiter._tat.clear()
            if first_sight:  # verify the signature every time
                policy.token_cache._entries.clear()
            return judge(policy, request, now, limiter)

        results.append((name, _per_call(call)))
    return results


WATCH = """
watch:
  - {name: probing, key: ip, counts: denied_paths, threshold: 20, window: 1m,
     action: ban, for: 10m}
  - {name: guessing, key: subject, counts: failed_credentials, threshold: 10, window: 5m,
     action: throttle, for: 5m}
"""


def bench_watch(policy_path: Path, bans: int = 10_000, rounds: int = 9) -> list[tuple[str, float]]:
    """judge() on allowed requests (a cached token; the public route) without
    a `watch:` section, with one and no bans, and with one and `bans` bans in
    force on other addresses and subjects: what the watch costs the traffic
    it lets through (allowed requests are never counted; only the bans are
    looked up)."""
    key = load_private_key(ensure_demo_keys(policy_path.parent / "keys"))
    text = policy_path.read_text()
    plain = parse_policy(text, str(policy_path), policy_path.parent)
    watched = parse_policy(text + WATCH, str(policy_path), policy_path.parent)
    user = mint(key, sub="alice", roles=["user"])
    now = time.time()
    many = {f"ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}": Ban("ban", "probing", now + 600)
            for i in range(bans // 2)}  # fmt: skip
    many.update((f"sub:https://issuer.example:u{i}", Ban("throttle", "guessing", now + 300))
                for i in range(bans - len(many)))  # fmt: skip
    requests = {
        "cached RS256 token (200)": RequestView.build(
            "GET", "/api/profile", (("authorization", f"Bearer {user}"),), "127.0.0.1"
        ),
        "public route, no token (200)": RequestView.build("GET", "/health", (), "127.0.0.1"),
    }
    limiter = MemoryStore()
    calls: list[tuple[str, Callable[[], object]]] = []
    for name, request in requests.items():
        for how, policy, table in (
            ("no watch:", plain, {}),
            ("watch:, no bans", watched, {}),
            (f"watch:, {bans:,} bans", watched, many),
        ):
            assert judge(policy, request, now, limiter, bans=table).allowed

            def call(
                policy: Policy = policy, table: Bans = table, r: RequestView = request
            ) -> object:
                limiter._tat.clear()
                return judge(policy, r, now, limiter, bans=table)

            calls.append((f"{name}, {how}", call))
    # Interleaved rounds, the fastest of each: a shared machine's noise only
    # ever adds time, and hits every variant alike.
    figures: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for i, (_, fn) in enumerate(calls):
            figures[i].append(_per_call(fn, 0.2))
    return [(name, min(f)) for (name, _), f in zip(calls, figures, strict=True)]


def bench_blocklist(entries: int = 1_000_000) -> tuple[float, float]:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        lines = [f"{format_ip(4, rng.getrandbits(32) & ~0xFF)}/24" for _ in range(entries // 2)]
        lines += [format_ip(4, rng.getrandbits(32)) for _ in range(entries - len(lines))]
        (folder / "feed.txt").write_text("\n".join(lines) + "\n")
        text = (
            "version: 1\nip: {block_files: [feed.txt]}\n"
            "rules: [{name: a, match: {path: /**}, allow: anyone}]\n"
        )
        # Parsed, never read from (or left in) the compiled-list cache:
        # bench_startup measures the cache.
        saved = os.environ.get("AUTHGATE_CACHE_DIR")
        os.environ["AUTHGATE_CACHE_DIR"] = "off"
        try:
            start = time.perf_counter()
            policy = parse_policy(text, str(folder / "p.yaml"), folder)
            load_s = time.perf_counter() - start
        finally:
            if saved is None:
                del os.environ["AUTHGATE_CACHE_DIR"]
            else:
                os.environ["AUTHGATE_CACHE_DIR"] = saved
    probe = [format_ip(4, rng.getrandbits(32)) for _ in range(1000)]
    req = [RequestView.build("GET", "/x", (), ip) for ip in probe]
    limiter = MemoryStore()
    i = 0

    def one() -> object:
        nonlocal i
        i = (i + 1) % len(req)
        return judge(policy, req[i], 0.0, limiter)

    return load_s, _per_call(one)


def main(argv: Sequence[str] | None = None) -> int:
    """`make bench [ARGS="..."]`: the in-process figures, then the end-to-end
    part (authgate.tools.bench_e2e; ARGS are its options) and start-up."""
    import sys

    from authgate.tools import bench_e2e

    # Bad options fail before the minute of in-process work, not after it.
    opts = bench_e2e.options(sys.argv[1:] if argv is None else argv)
    policy = Path("policies/example.yaml")
    print("decide() on policies/example.yaml, one core, per call:")
    for name, secs in bench_decide(policy):
        print(f"  {name:38s} {secs * 1e6:8.1f} µs  ({1 / secs:9.0f} /s)")
    print("judge() on allowed requests, and the watch (docs/watch.md), per call:")
    for name, secs in bench_watch(policy):
        print(f"  {name:52s} {secs * 1e6:8.2f} µs")
    load_s, per = bench_blocklist()
    print("block list of 1,000,000 entries (half /24 networks, half addresses):")
    print(f"  {'policy load':38s} {load_s:8.2f} s")
    print(f"  {'decide() with it, random clients':38s} {per * 1e6:8.1f} µs")
    bench_rules()
    code = bench_e2e.run(opts)
    try:
        from authgate.tools import bench_startup
    except ImportError:
        return code
    bench_startup.main()
    return code


def bench_rules(
    counts: tuple[int, ...] = (10, 1000), calls: int = 20_000
) -> list[tuple[int, float, float]]:
    """decide() with a cached token on generated policies of `counts` rules
    (distinct literal prefixes; a third with a parameter, a third bound to
    methods, a third ending in `**`), on a request that only a rule near the
    end matches: the worst case for a linear scan. Prints and returns
    (rules, p50 s, p99 s)."""
    policies = Path("policies")
    key = load_private_key(ensure_demo_keys(policies / "keys"))
    user = mint(key, sub="alice", roles=["user"])
    headers = (("authorization", f"Bearer {user}"),)
    now = time.time()
    print("decide() by rule count, cached RS256 token, a rule near the end matches:")
    out = []
    for count in counts:
        lines = [
            "version: 1",
            "authn:",
            "  jwt:",
            "    - {name: demo, issuer: https://issuer.example, audience: api,",
            "       algorithms: [RS256], jwks_file: keys/jwks.json}",
            "rules:",
        ]
        for i in range(count):
            match = (
                f'{{path: "/svc{i}/items/{{id}}"}}'
                if i % 3 == 0
                else f"{{path: /svc{i}/reports, methods: [POST, PUT]}}"
                if i % 3 == 1
                else f'{{path: "/svc{i}/**"}}'
            )
            lines.append(f"  - {{name: r{i}, match: {match}, allow: authenticated}}")
        text = "\n".join(lines) + "\n"
        policy = parse_policy(text, str(policies / f"rules-{count}.yaml"), policies)
        last = count - 1 - (count - 1) % 3  # the last "/svcN/items/{id}" rule
        request = RequestView.build("GET", f"/svc{last}/items/42", headers, "127.0.0.1")
        limiter = MemoryStore()
        if judge(policy, request, now, limiter).rule != f"r{last}":
            raise RuntimeError(f"the {count}-rule bench policy does not pick r{last}")
        clock = time.perf_counter_ns
        samples = []
        for _ in range(calls):
            start = clock()
            judge(policy, request, now, limiter)
            samples.append(clock() - start)
        samples.sort()
        p50, p99 = samples[calls // 2] / 1e9, samples[calls * 99 // 100] / 1e9
        print(f"  {count:5d} rules{'':26s} p50 {p50 * 1e6:6.1f} µs  p99 {p99 * 1e6:6.1f} µs")
        out.append((count, p50, p99))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
