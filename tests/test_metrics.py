"""The decision counters every request updates are plain integers exposed at
scrape time: their exposition must be what prometheus-client's own Counter and
Histogram give for the same updates (less the `_created` series)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authgate.runtime.metrics import Metrics

BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
DECISIONS = st.tuples(
    st.sampled_from(["allow", "deny", "would_deny"]),
    st.sampled_from([0, 401, 403, 429]),
    st.sampled_from(["-", "profile", "admin"]),
    st.sampled_from(["allowed", "no_credentials", "forbidden"]),
)
# Bounds themselves too: a bucket counts what is less than or equal to it.
SECONDS = st.one_of(st.sampled_from(BUCKETS), st.floats(0, 0.2, allow_nan=False))


def samples(
    text: bytes, names: tuple[str, ...]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name.startswith(names) and not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@given(st.lists(DECISIONS, max_size=30), st.lists(SECONDS, max_size=30))
def test_the_counts_read_as_the_librarys_own(
    decisions: list[tuple[str, int, str, str]], times: list[float]
) -> None:
    ours = Metrics(lambda: None)
    theirs = CollectorRegistry()
    counter = Counter(
        "authgate_decisions", "d", ["decision", "status", "rule", "reason"], registry=theirs
    )
    histogram = Histogram("authgate_decision_seconds", "t", buckets=BUCKETS, registry=theirs)
    for outcome, status, rule, reason in decisions:
        ours.decided(outcome, status, rule, reason)
        counter.labels(outcome, str(status), rule, reason).inc()
    for seconds in times:
        ours.decision_seconds(seconds)
        histogram.observe(seconds)
    names = ("authgate_decisions", "authgate_decision_seconds")
    got = samples(generate_latest(ours.registry), names)
    want = samples(generate_latest(theirs), names)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-9, key
