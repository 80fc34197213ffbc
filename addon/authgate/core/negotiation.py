"""Who is asking: content negotiation and browser navigations.

Pure functions over request headers, used by `decide()` (login redirects)
and by `responses.render()` (which body form to send).
"""

from __future__ import annotations

from collections.abc import Sequence

JSON = "json"
HTML = "html"
TEXT = "text"

# Media ranges we can answer, most specific first, and the form each gets.
_OFFERS: tuple[tuple[str, str], ...] = (
    ("application/problem+json", JSON),
    ("application/json", JSON),
    ("text/html", HTML),
    ("application/xhtml+xml", HTML),
    ("text/plain", TEXT),
)


def parse_accept(value: str) -> list[tuple[str, float]]:
    """`Accept` -> [(media range, q)], malformed parts skipped."""
    out: list[tuple[str, float]] = []
    for part in value.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if "/" not in media:
            continue
        q = 1.0
        for param in params:
            name, _, v = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(v.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        out.append((media.lower(), q))
    return out


def _quality(ranges: list[tuple[str, float]], media: str) -> tuple[float, int]:
    """q for `media` under the most specific matching range, and that range's specificity."""
    kind = media.split("/")[0]
    best: tuple[float, int] = (0.0, -1)
    for rng, q in ranges:
        if rng == media:
            spec = 2
        elif rng == f"{kind}/*":
            spec = 1
        elif rng == "*/*":
            spec = 0
        else:
            continue
        if spec > best[1]:
            best = (q, spec)
    return best


def body_form(accept: str | None) -> str:
    """JSON (problem+json) unless the client prefers HTML or plain text."""
    if not accept:
        return JSON
    ranges = parse_accept(accept)
    best_form, best_q, best_spec = JSON, 0.0, -1
    for media, form in _OFFERS:
        q, spec = _quality(ranges, media)
        # Higher q wins; on a tie the explicitly named type beats a wildcard,
        # and earlier offers (JSON) beat later ones.
        if q > best_q or (q == best_q and q > 0 and spec > best_spec):
            best_form, best_q, best_spec = form, q, spec
    return best_form if best_q > 0 else JSON


def is_browser_navigation(method: str, headers: Sequence[tuple[str, str]]) -> bool:
    """A person's browser loading a page: GET/HEAD, prefers HTML, not fetch/XHR."""
    if method not in ("GET", "HEAD"):
        return False
    accept = None
    for name, value in headers:
        if name == "sec-fetch-mode" and value.strip().lower() != "navigate":
            return False
        if name == "x-requested-with":
            return False
        if name == "accept":
            accept = value
    if not accept:
        return False
    ranges = parse_accept(accept)
    html = _quality(ranges, "text/html")
    json = _quality(ranges, "application/json")
    # The type must be named: "*/*" alone is what API clients send.
    return html[1] == 2 and html[0] > 0 and html[0] >= json[0]
