"""Content negotiation and browser navigations: `authgate.core.negotiation`.

Conformance checks: P-01 (problem+json is the default body; HTML only when
the client prefers it), RFC 9110 §12.5.1 (Accept, q values, wildcards, q=0
means "not acceptable").
"""

from __future__ import annotations

import pytest

from authgate.core.negotiation import body_form, is_browser_navigation, parse_accept

P = pytest.param

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(
    ("value", "ranges"),
    [
        P("text/html", [("text/html", 1.0)], id="one-type"),
        P("", [], id="empty"),
        P("text/html;q=0.5", [("text/html", 0.5)], id="q"),
        P("text/html ; q=0.5", [("text/html", 0.5)], id="spaces-around-semicolon"),
        P("text/html;q = 0.5", [("text/html", 0.5)], id="spaces-around-equals"),
        P("text/html;Q=0.5", [("text/html", 0.5)], id="q-name-case-insensitive"),
        P("TEXT/HTML", [("text/html", 1.0)], id="type-lower-cased"),
        P("text/html;q=0", [("text/html", 0.0)], id="q-zero"),
        P("text/html;q=1.000", [("text/html", 1.0)], id="q-three-decimals"),
        P("text/html;level=1;q=0.3", [("text/html", 0.3)], id="media-parameter-dropped"),
        P("text/html;q=abc", [("text/html", 0.0)], id="q-not-a-number-is-zero"),
        P("text/html;q=", [("text/html", 0.0)], id="q-empty-is-zero"),
        P("text/html;q=2", [("text/html", 0.0)], id="q-above-one-is-zero"),
        P("text/html;q=-0.5", [("text/html", 0.0)], id="q-negative-is-zero"),
        P("text/html;q=nan", [("text/html", 0.0)], id="q-nan-is-zero"),
        P("text/html;q=inf", [("text/html", 0.0)], id="q-inf-is-zero"),
        P(
            "text/html, application/json;q=0.9 ,*/*;q=0.1",
            [("text/html", 1.0), ("application/json", 0.9), ("*/*", 0.1)],
            id="list-with-spaces",
        ),
        P(
            "html, text/plain, ;q=1, , application/json",
            [("text/plain", 1.0), ("application/json", 1.0)],
            id="malformed-parts-skipped",
        ),
        P("text/html,,", [("text/html", 1.0)], id="empty-parts-skipped"),
        P(
            BROWSER_ACCEPT,
            [
                ("text/html", 1.0),
                ("application/xhtml+xml", 1.0),
                ("application/xml", 0.9),
                ("*/*", 0.8),
            ],
            id="browser",
        ),
    ],
)
def test_parse_accept(value: str, ranges: list[tuple[str, float]]) -> None:
    assert parse_accept(value) == ranges


@pytest.mark.parametrize(
    ("accept", "form"),
    [
        P(None, "json", id="no-accept"),
        P("", "json", id="empty-accept"),
        P("application/json", "json", id="json"),
        P("application/problem+json", "json", id="problem-json"),
        P("text/html", "html", id="html"),
        P("application/xhtml+xml", "html", id="xhtml"),
        P(BROWSER_ACCEPT, "html", id="browser"),
        P("*/*", "json", id="anything-gets-json"),
        P("text/plain", "text", id="text-plain"),
        # "text/*" matches text/html and text/plain equally (q=1, both through
        # the wildcard); ties go to the earlier offer in _OFFERS, and text/html
        # is listed before text/plain.
        P("text/*", "html", id="text-wildcard-is-html"),
        P("application/*", "json", id="application-wildcard"),
        P("application/json;q=0.5, text/html", "html", id="html-preferred-by-q"),
        P("text/html;q=0.5, application/json", "json", id="json-preferred-by-q"),
        P("text/html, application/json", "json", id="tie-goes-to-json"),
        P("text/html;q=0", "json", id="html-refused"),
        P("text/html;q=0, */*", "json", id="html-refused-beside-wildcard"),
        P("text/html;q=0, text/*", "text", id="html-refused-text-wildcard"),
        P("image/png", "json", id="nothing-we-offer"),
        P("image/png, text/plain;q=0.1", "text", id="only-offer-at-low-q"),
        P("*/*;q=0.1, text/html;q=0.2", "html", id="named-beats-wildcard-by-q"),
        P("text/*;q=0.9, text/plain", "text", id="specific-beats-wildcard"),
        P("application/json;q=0, text/plain;q=0.1", "text", id="json-refused"),
        P("garbage", "json", id="garbage"),
        P("text/html;q=abc", "json", id="bad-q-means-not-acceptable"),
    ],
)
def test_body_form(accept: str | None, form: str) -> None:
    assert body_form(accept) == form


CHROME_NAV = [
    ("accept", BROWSER_ACCEPT),
    ("sec-fetch-mode", "navigate"),
    ("sec-fetch-dest", "document"),
]


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        P("GET", [("accept", BROWSER_ACCEPT)], True, id="browser-get"),
        P("HEAD", [("accept", BROWSER_ACCEPT)], True, id="browser-head"),
        P("GET", CHROME_NAV, True, id="sec-fetch-navigate"),
        P(
            "GET",
            [("sec-fetch-mode", "Navigate"), ("accept", "text/html")],
            True,
            id="navigate-case",
        ),
        P("POST", [("accept", BROWSER_ACCEPT)], False, id="post"),
        P("PUT", [("accept", BROWSER_ACCEPT)], False, id="put"),
        P("get", [("accept", BROWSER_ACCEPT)], False, id="method-is-case-sensitive"),
        P("GET", [("accept", BROWSER_ACCEPT), ("sec-fetch-mode", "cors")], False, id="fetch-cors"),
        P(
            "GET",
            [("accept", BROWSER_ACCEPT), ("sec-fetch-mode", "no-cors")],
            False,
            id="fetch-no-cors",
        ),
        P(
            "GET",
            [("accept", BROWSER_ACCEPT), ("sec-fetch-mode", "same-origin")],
            False,
            id="fetch-same-origin",
        ),
        P(
            "GET",
            [("accept", BROWSER_ACCEPT), ("x-requested-with", "XMLHttpRequest")],
            False,
            id="xhr",
        ),
        P("GET", [("accept", "*/*")], False, id="accept-anything"),
        P("GET", [("accept", "application/json")], False, id="accept-json"),
        P("GET", [("accept", "text/*")], False, id="accept-text-wildcard"),
        P("GET", [], False, id="no-accept"),
        P("GET", [("accept", "")], False, id="empty-accept"),
        P("GET", [("accept", "text/html;q=0")], False, id="html-refused"),
        P("GET", [("accept", "text/html;q=0.5, application/json")], False, id="json-preferred"),
        P("GET", [("accept", "text/html, application/json")], True, id="html-json-tie"),
        P("GET", [("accept", "text/html;q=0.5, */*")], False, id="json-preferred-via-wildcard"),
        P("GET", [("accept", "text/html, */*;q=0.8")], True, id="html-named-beside-wildcard"),
    ],
)
def test_is_browser_navigation(method: str, headers: list[tuple[str, str]], expected: bool) -> None:
    assert is_browser_navigation(method, headers) is expected
