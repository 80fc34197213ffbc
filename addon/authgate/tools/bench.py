"""`make bench`: what the core costs, measured (never asserted in tests).

Times `decide()` on the reference policy for a few kinds of request, and the
load of a generated one-million-entry block list. The end-to-end benchmark
through mitmproxy under wrk belongs to the performance work; this one needs
nothing but the package.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from authgate.core.decision import RequestView, judge
from authgate.core.ipset import format_ip
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
        start = time.perf_counter()
        policy = parse_policy(text, str(folder / "p.yaml"), folder)
        load_s = time.perf_counter() - start
    probe = [format_ip(4, rng.getrandbits(32)) for _ in range(1000)]
    req = [RequestView.build("GET", "/x", (), ip) for ip in probe]
    limiter = MemoryStore()
    i = 0

    def one() -> object:
        nonlocal i
        i = (i + 1) % len(req)
        return judge(policy, req[i], 0.0, limiter)

    return load_s, _per_call(one)


def main() -> None:
    policy = Path("policies/example.yaml")
    print("decide() on policies/example.yaml, one core, per call:")
    for name, secs in bench_decide(policy):
        print(f"  {name:38s} {secs * 1e6:8.1f} µs  ({1 / secs:9.0f} /s)")
    load_s, per = bench_blocklist()
    print("block list of 1,000,000 entries (half /24 networks, half addresses):")
    print(f"  {'policy load':38s} {load_s:8.2f} s")
    print(f"  {'decide() with it, random clients':38s} {per * 1e6:8.1f} µs")


if __name__ == "__main__":
    main()
