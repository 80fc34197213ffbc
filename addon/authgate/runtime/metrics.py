"""Prometheus metrics (`--set authgate_metrics=HOST:PORT`), with the official
client library. Each gateway has its own registry, so several can live in
one process (the tests run many)."""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from authgate.core.model import Ban, Policy


class _KeySets(Collector):
    """JWKS fetch counts, read from the live key sets at scrape time."""

    def __init__(self, policy: Callable[[], Policy | None]) -> None:
        self.policy = policy

    def collect(self) -> Iterator[Any]:
        fetches = CounterMetricFamily(
            "authgate_jwks_fetches",
            "HTTP fetches of JWKS and discovery documents",
            labels=["issuer"],
        )
        failures = CounterMetricFamily(
            "authgate_jwks_fetch_failures", "Failed JWKS refreshes", labels=["issuer"]
        )
        keys = GaugeMetricFamily("authgate_jwks_keys", "Usable keys per issuer", labels=["issuer"])
        policy = self.policy()
        for issuer, remote in policy.remote_keys if policy is not None else ():
            fetches.add_metric([issuer], remote.fetches)
            failures.add_metric([issuer], remote.failures_total)
            keys.add_metric([issuer], len(remote.keys))
        yield fetches
        yield failures
        yield keys


class _Bans(Collector):
    """The watch's bans in force, by action, read from the table at scrape time."""

    def __init__(self, bans: Callable[[], Mapping[str, Ban]]) -> None:
        self.bans = bans

    def collect(self) -> Iterator[Any]:
        gauge = GaugeMetricFamily(
            "authgate_watch_bans", "Bans and throttles of the watch in force", labels=["action"]
        )
        counts = {"ban": 0, "throttle": 0}
        for ban in list(self.bans().values()):
            counts[ban.action] = counts.get(ban.action, 0) + 1
        for action, n in sorted(counts.items()):
            gauge.add_metric([action], n)
        yield gauge


class _Introspection(Collector):
    """Introspection calls and answers, read from the live issuers at scrape time."""

    def __init__(self, policy: Callable[[], Policy | None]) -> None:
        self.policy = policy

    def collect(self) -> Iterator[Any]:
        calls = CounterMetricFamily(
            "authgate_introspection_calls",
            "Token introspection requests made to the issuer (RFC 7662)",
            labels=["issuer"],
        )
        failures = CounterMetricFamily(
            "authgate_introspection_failures",
            "Introspection requests with no usable answer (down, slow, broken)",
            labels=["issuer"],
        )
        shared = CounterMetricFamily(
            "authgate_introspection_shared_hits",
            "Introspection answers found in the shared store instead of asking",
            labels=["issuer"],
        )
        remembered = GaugeMetricFamily(
            "authgate_introspection_remembered",
            "Introspection answers remembered in this process",
            labels=["issuer"],
        )
        policy = self.policy()
        for issuer in policy.issuers if policy is not None else ():
            source = issuer.introspection
            if source is not None:
                calls.add_metric([issuer.issuer], source.calls)
                failures.add_metric([issuer.issuer], source.failures_total)
                shared.add_metric([issuer.issuer], source.shared_hits)
                remembered.add_metric([issuer.issuer], len(source))
        yield calls
        yield failures
        yield shared
        yield remembered


class _Decisions(Collector):
    """What every request updates, counted as plain integers and turned into
    metric families at scrape time: a prometheus_client Counter or Histogram
    takes a lock on every update (the two cost about 1 us of each request).
    Only the event loop writes; a scrape (another thread) reads a snapshot.
    Not in a worker of `--workers N` (see Metrics)."""

    DOC = (
        "Decisions by outcome (allow, deny, would_deny), status (the answer, or the "
        "would-be answer in report mode; 0 when allowed), rule and reason"
    )

    def __init__(self, buckets: Sequence[float]) -> None:
        self.counts: dict[tuple[str, int, str, str], int] = {}
        self.bounds = tuple(buckets)
        self.in_bucket = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.seconds = 0.0

    def timed(self, seconds: float) -> None:
        self.in_bucket[bisect_left(self.bounds, seconds)] += 1  # bucket "le" its bound
        self.seconds += seconds

    def collect(self) -> Iterator[Any]:
        decisions = CounterMetricFamily(
            "authgate_decisions", self.DOC, labels=["decision", "status", "rule", "reason"]
        )
        for (outcome, status, rule, reason), n in list(self.counts.items()):
            decisions.add_metric([outcome, str(status), rule, reason], n)
        yield decisions
        cumulative = list(accumulate(self.in_bucket))
        bounds = [*(f"{b:g}" for b in self.bounds), "+Inf"]
        yield HistogramMetricFamily(
            "authgate_decision_seconds",
            "Time to decide one request",
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=self.seconds,
        )


class Metrics:
    def __init__(
        self,
        policy: Callable[[], Policy | None],
        bans: Callable[[], Mapping[str, Ban]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        buckets = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
        self.decision_seconds: Callable[[float], None]  # the time to decide one request
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # A worker of `authgate run --workers N`: its counts must go to the
            # files the supervisor's /metrics sums, which only the library's
            # own Counter and Histogram write.
            self._decisions: _Decisions | None = None
            self._by_labels = Counter(
                "authgate_decisions",
                _Decisions.DOC,
                ["decision", "status", "rule", "reason"],
                registry=r,
            )
            self.decision_seconds = Histogram(
                "authgate_decision_seconds",
                "Time to decide one request",
                buckets=buckets,
                registry=r,
            ).observe
        else:
            self._decisions = _Decisions(buckets)
            r.register(self._decisions)
            self.decision_seconds = self._decisions.timed
        self.would_deny = Counter(
            "authgate_would_deny",
            "Denials not enforced (report mode), by rule and status",
            ["rule", "status", "reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "authgate_rate_limited", "Requests refused with 429, by limit", ["limit"], registry=r
        )
        self.reloads = Counter(
            "authgate_policy_reloads", "Policy reloads that took effect", registry=r
        )
        self.reload_failures = Counter(
            "authgate_policy_reload_failures",
            "Policy reloads refused (last good kept)",
            registry=r,
        )
        self.lint = Counter(
            "authgate_upstream_lint_findings",
            "Backend auth mistakes seen, by rule and finding",
            ["rule", "finding", "repaired"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "authgate_store_seconds",
            "Round trip to the shared rate-limit store (one per request with limits)",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.store_errors = Counter(
            "authgate_store_errors",
            "Requests whose limits the shared store could not judge",
            registry=r,
        )
        self.store_fallbacks = Counter(
            "authgate_store_fallbacks",
            "Requests judged without the shared store, by on_store_error (local, deny, allow)",
            ["mode"],
            registry=r,
        )
        self.near_limits = Counter(
            "authgate_rate_limit_near",
            "Requests allowed with less than a tenth of their limit left, by limit",
            ["limit"],
            registry=r,
        )
        self.watch_events = Counter(
            "authgate_watch_events",
            "Keys that reached a watch's threshold, by watch and action "
            "(ban, throttle, none; report in report mode)",
            ["watch", "action"],
            registry=r,
        )
        r.register(_KeySets(policy))
        if bans is not None:
            r.register(_Bans(bans))
        r.register(_Introspection(policy))
        # Label children by their label values: looked up once, then reused
        # (a policy has few rules and reasons, so these stay small).
        self._children: dict[tuple[str, str, str, str], Any] = {}
        self._near: dict[str, Any] = {}
        self._server: Any = None

    def decided(self, outcome: str, status: int, rule: str, reason: str) -> None:
        if self._decisions is not None:
            counts = self._decisions.counts
            key = (outcome, status, rule, reason)  # the status a label at scrape time
            counts[key] = counts.get(key, 0) + 1
            return
        labels = (outcome, str(status), rule, reason)
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._by_labels.labels(*labels)
        child.inc()

    def watch_event(self, watch: str, action: str) -> None:
        self.watch_events.labels(watch, action).inc()

    def near_limit(self, limit_id: str) -> None:
        child = self._near.get(limit_id)
        if child is None:
            child = self._near[limit_id] = self.near_limits.labels(limit_id.split("|", 1)[0])
        child.inc()

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"authgate_metrics must be HOST:PORT, not {address!r}")
        server, _thread = start_http_server(
            int(port), host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        self._server = server

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
