"""Access conditions: templates, claim paths, every condition kind, missing_scopes."""

from __future__ import annotations

from typing import Any

import pytest

from authgate.core.conditions import (
    AllOf,
    AnyOf,
    Anyone,
    Authenticated,
    Claim,
    Condition,
    HasRole,
    HasScope,
    Nobody,
    Not,
    Template,
    claim_at,
    condition_tree,
    missing_scopes,
    params_named,
)
from authgate.core.identity import Identity

CLAIMS: dict[str, Any] = {
    "sub": "alice",
    "tenant": "t1",
    "team": "team-red",
    "level": 1,
    "level_str": "1",
    "admin": True,
    "flag_int": 1,
    "ratio": 1.0,
    "groups": ["g1", "g2", 3],
    "org": {"id": "o1", "unit": {"name": "ops"}},
    "nothing": None,
}


def who(roles: tuple[str, ...] = (), scopes: tuple[str, ...] = (), **claims: Any) -> Identity:
    return Identity(
        subject="alice",
        issuer="https://as.test",
        method="jwt",
        roles=frozenset(roles),
        scopes=frozenset(scopes),
        claims={**CLAIMS, **claims},
    )


ALICE = who(roles=("user",), scopes=("read",))
ADMIN = who(roles=("admin", "user"), scopes=("read", "write"))
NO_SCOPES = who()


def claim(path: str, op: str, value: Any) -> Claim:
    if op == "in":
        return Claim(tuple(path.split(".")), op, tuple(Template.parse(v) for v in value))
    return Claim(tuple(path.split(".")), op, Template.parse(value))


# --- Template ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "parts", "params"),
    [
        pytest.param("plain", (), frozenset(), id="plain-string"),
        pytest.param("", (), frozenset(), id="empty-string"),
        pytest.param(5, (), frozenset(), id="int"),
        pytest.param(True, (), frozenset(), id="bool"),
        pytest.param(None, (), frozenset(), id="null"),
        pytest.param(["a"], (), frozenset(), id="list"),
        pytest.param("{id}", ((True, "id"),), frozenset({"id"}), id="whole-param"),
        pytest.param("team-{t}", ((False, "team-"), (True, "t")), frozenset({"t"}), id="prefix"),
        pytest.param("{t}-x", ((True, "t"), (False, "-x")), frozenset({"t"}), id="suffix"),
        pytest.param(
            "{a}/{b_2}", ((True, "a"), (False, "/"), (True, "b_2")), frozenset({"a", "b_2"}),
            id="two-params",
        ),
        pytest.param("{a}{a}", ((True, "a"), (True, "a")), frozenset({"a"}), id="repeated"),
        pytest.param("{_x}", ((True, "_x"),), frozenset({"_x"}), id="underscore-name"),
        pytest.param("a}b", (), frozenset(), id="lone-closing-brace-no-opening"),
    ],
)  # fmt: skip
def test_template_parse(
    raw: Any, parts: tuple[tuple[bool, str], ...], params: frozenset[str]
) -> None:
    t = Template.parse(raw)
    assert t.raw == raw
    assert t.parts == parts
    assert t.params == params


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("{id", id="unclosed"),
        pytest.param("{}", id="empty-name"),
        pytest.param("{1x}", id="name-starts-with-digit"),
        pytest.param("{a-b}", id="dash-in-name"),
        pytest.param("{{id}}", id="double-braces"),
        pytest.param("x{id}}", id="stray-closing-brace"),
        pytest.param("{id} {", id="stray-opening-brace"),
        pytest.param("{ id }", id="spaces-in-braces"),
    ],
)
def test_template_parse_rejects(raw: str) -> None:
    with pytest.raises(ValueError, match="bad parameter reference"):
        Template.parse(raw)


@pytest.mark.parametrize(
    ("raw", "params", "value"),
    [
        pytest.param("{id}", {"id": "42"}, "42", id="whole"),
        pytest.param("team-{t}", {"t": "red"}, "team-red", id="prefix"),
        pytest.param("{a}/{b}", {"a": "x", "b": "y"}, "x/y", id="two"),
        pytest.param("{a}{a}", {"a": "z"}, "zz", id="repeated"),
        pytest.param("{id}", {"id": ""}, "", id="empty-value"),
        pytest.param("plain", {"id": "42"}, "plain", id="no-params"),
        pytest.param(7, {}, 7, id="int-unchanged"),
        pytest.param(True, {}, True, id="bool-unchanged"),
        pytest.param(None, {}, None, id="null-unchanged"),
    ],
)
def test_template_value(raw: Any, params: dict[str, str], value: Any) -> None:
    assert Template.parse(raw).value(params) == value
    assert type(Template.parse(raw).value(params)) is type(value)


# --- claim_at ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("sub",), "alice", id="top-level"),
        pytest.param(("org", "id"), "o1", id="nested"),
        pytest.param(("org", "unit", "name"), "ops", id="deeper"),
        pytest.param(("org",), {"id": "o1", "unit": {"name": "ops"}}, id="object"),
        pytest.param(("groups",), ["g1", "g2", 3], id="list"),
        pytest.param(("missing",), None, id="missing"),
        pytest.param(("org", "missing"), None, id="nested-missing"),
        pytest.param(("sub", "x"), None, id="through-a-string"),
        pytest.param(("groups", "0"), None, id="through-a-list"),
        pytest.param(("nothing",), None, id="explicit-null"),
        pytest.param(("admin",), True, id="boolean"),
        pytest.param((), CLAIMS, id="empty-path"),
    ],
)
def test_claim_at(path: tuple[str, ...], value: Any) -> None:
    assert claim_at(CLAIMS, path) == value


# --- conditions ---------------------------------------------------------------------

P = {"id": "alice", "t": "t1", "other": "bob", "color": "red", "g": "g2", "n": "1"}

CASES = [
    # simple
    ("anyone", Anyone(), None, True),
    ("anyone-authenticated", Anyone(), ALICE, True),
    ("authenticated-anonymous", Authenticated(), None, False),
    ("authenticated", Authenticated(), ALICE, True),
    ("nobody-anonymous", Nobody(), None, False),
    ("nobody-admin", Nobody(), ADMIN, False),
    # role / scope
    ("role-anonymous", HasRole("admin"), None, False),
    ("role-missing", HasRole("admin"), ALICE, False),
    ("role-present", HasRole("admin"), ADMIN, True),
    ("role-case-sensitive", HasRole("Admin"), ADMIN, False),
    ("scope-anonymous", HasScope("read"), None, False),
    ("scope-present", HasScope("read"), ALICE, True),
    ("scope-missing", HasScope("write"), ALICE, False),
    ("scope-case-sensitive", HasScope("Read"), ALICE, False),
    ("scope-not-a-role", HasScope("user"), ALICE, False),
    ("role-not-a-scope", HasRole("read"), ALICE, False),
    # claim equals
    ("equals-anonymous", claim("sub", "equals", "alice"), None, False),
    ("equals-literal", claim("sub", "equals", "alice"), ALICE, True),
    ("equals-literal-other", claim("sub", "equals", "bob"), ALICE, False),
    ("equals-template", claim("sub", "equals", "{id}"), ALICE, True),
    ("equals-template-other", claim("sub", "equals", "{other}"), ALICE, False),
    ("equals-template-prefix", claim("team", "equals", "team-{color}"), ALICE, True),
    ("equals-nested", claim("org.unit.name", "equals", "ops"), ALICE, True),
    ("equals-missing-claim", claim("nope", "equals", "x"), ALICE, False),
    ("equals-int", claim("level", "equals", 1), ALICE, True),
    ("equals-int-vs-string", claim("level", "equals", "1"), ALICE, False),
    ("equals-string-vs-int", claim("level_str", "equals", 1), ALICE, False),
    ("equals-string-vs-template", claim("level_str", "equals", "{n}"), ALICE, True),
    ("equals-int-vs-template", claim("level", "equals", "{n}"), ALICE, False),
    ("equals-true", claim("admin", "equals", True), ALICE, True),
    ("equals-true-vs-1", claim("admin", "equals", 1), ALICE, False),
    ("equals-1-vs-true", claim("flag_int", "equals", True), ALICE, False),
    ("equals-true-vs-string", claim("admin", "equals", "true"), ALICE, False),
    ("equals-null-claim", claim("nothing", "equals", None), ALICE, False),
    ("equals-list-vs-item", claim("groups", "equals", "g1"), ALICE, False),
    # claim in
    ("in-anonymous", claim("tenant", "in", ["t1", "t2"]), None, False),
    ("in-match", claim("tenant", "in", ["t0", "t1"]), ALICE, True),
    ("in-no-match", claim("tenant", "in", ["t2", "t3"]), ALICE, False),
    ("in-template", claim("tenant", "in", ["x", "{t}"]), ALICE, True),
    ("in-int-vs-string", claim("level", "in", ["1", "2"]), ALICE, False),
    ("in-int", claim("level", "in", [2, 1]), ALICE, True),
    ("in-bool-vs-int", claim("admin", "in", [1, 0]), ALICE, False),
    ("in-list-claim", claim("groups", "in", ["g1"]), ALICE, False),
    # claim contains
    ("contains-anonymous", claim("groups", "contains", "g1"), None, False),
    ("contains", claim("groups", "contains", "g1"), ALICE, True),
    ("contains-template", claim("groups", "contains", "{g}"), ALICE, True),
    ("contains-missing", claim("groups", "contains", "g9"), ALICE, False),
    ("contains-int", claim("groups", "contains", 3), ALICE, True),
    ("contains-string-vs-int", claim("groups", "contains", "3"), ALICE, False),
    ("contains-on-string-claim", claim("sub", "contains", "ali"), ALICE, False),
    ("contains-on-equal-string", claim("sub", "contains", "alice"), ALICE, False),
    ("contains-missing-claim", claim("nope", "contains", "x"), ALICE, False),
    # any / all / not
    ("any-anonymous-anyone", AnyOf((HasRole("admin"), Anyone())), None, True),
    ("any-anonymous", AnyOf((HasRole("admin"), claim("sub", "equals", "{id}"))), None, False),
    ("any-owner", AnyOf((HasRole("admin"), claim("sub", "equals", "{id}"))), ALICE, True),
    ("any-neither", AnyOf((HasRole("admin"), claim("sub", "equals", "{other}"))), ALICE, False),
    ("any-admin", AnyOf((HasRole("admin"), claim("sub", "equals", "{other}"))), ADMIN, True),
    ("all-both", AllOf((HasRole("user"), HasScope("read"))), ALICE, True),
    ("all-one-missing", AllOf((HasRole("user"), HasScope("write"))), ALICE, False),
    ("all-anonymous", AllOf((Anyone(), Authenticated())), None, False),
    ("all-anonymous-anyone", AllOf((Anyone(), Anyone())), None, True),
    ("not-role-anonymous", Not(HasRole("banned")), None, True),
    ("not-role", Not(HasRole("user")), ALICE, False),
    ("not-role-absent", Not(HasRole("banned")), ALICE, True),
    ("not-authenticated-anonymous", Not(Authenticated()), None, True),
    ("not-authenticated", Not(Authenticated()), ALICE, False),
    ("not-not", Not(Not(HasScope("read"))), ALICE, True),
    (
        "nested",
        AllOf((Authenticated(), AnyOf((HasRole("admin"), claim("tenant", "equals", "{t}"))))),
        ALICE,
        True,
    ),
    (
        "nested-wrong-tenant",
        AllOf((Authenticated(), AnyOf((HasRole("admin"), claim("tenant", "equals", "{other}"))))),
        ALICE,
        False,
    ),
]


@pytest.mark.parametrize(
    ("cond", "identity", "expected"), [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
def test_condition_holds(cond: Condition, identity: Identity | None, expected: bool) -> None:
    assert cond.holds(identity, P) is expected


def test_claim_template_uses_this_requests_params() -> None:
    owner = claim("sub", "equals", "{id}")
    assert owner.holds(ALICE, {"id": "alice"}) is True
    assert owner.holds(ALICE, {"id": "bob"}) is False
    assert owner.holds(ALICE, {"id": "Alice"}) is False


# --- params_named ---------------------------------------------------------------------


def test_params_named() -> None:
    cond = AnyOf(
        (
            AllOf((HasScope("a"), Not(HasScope("b")))),
            claim("tenant", "in", ["{t}", "x-{u}"]),
            claim("sub", "equals", "{id}"),
            HasRole("c"),
        )
    )
    assert params_named(cond) == frozenset({"t", "u", "id"})
    assert params_named(Anyone()) == frozenset()


# --- missing_scopes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cond", "identity", "expected"),
    [
        pytest.param(HasScope("write"), ALICE, ("write",), id="scope-missing"),
        pytest.param(HasScope("write"), NO_SCOPES, ("write",), id="scope-missing-no-scopes"),
        pytest.param(HasScope("read"), ALICE, (), id="scope-present-condition-holds"),
        pytest.param(HasRole("admin"), ALICE, (), id="role-failure"),
        pytest.param(Nobody(), ALICE, (), id="nobody"),
        pytest.param(claim("sub", "equals", "{other}"), ALICE, (), id="claim-failure"),
        pytest.param(
            AllOf((HasScope("write"), HasScope("admin"))), ALICE, ("admin", "write"),
            id="all-two-scopes-sorted",
        ),
        pytest.param(
            AllOf((HasScope("read"), HasScope("write"))), ALICE, ("write",),
            id="all-only-the-missing-one",
        ),
        pytest.param(
            AllOf((HasScope("write"), HasRole("admin"))), ALICE, (), id="scope-and-failing-role"
        ),
        pytest.param(
            AllOf((HasScope("write"), HasRole("user"))), ALICE, ("write",),
            id="scope-and-held-role",
        ),
        pytest.param(
            AnyOf((HasScope("write"), HasRole("admin"))), ALICE, ("write",), id="any-scope-or-role"
        ),
        pytest.param(Not(HasScope("read")), ALICE, (), id="not-scope-held"),
        pytest.param(
            AllOf((Not(HasScope("read")), HasScope("write"))), ALICE, (),
            id="not-held-scope-and-scope",
        ),
        pytest.param(
            AllOf((Not(HasScope("banned")), HasScope("write"))), ALICE, ("write",),
            id="not-absent-scope-and-missing-scope",
        ),
        pytest.param(
            AllOf((HasScope("write"), claim("sub", "equals", "{id}"))), ALICE, ("write",),
            id="scope-and-owner",
        ),
        pytest.param(
            AllOf((HasScope("write"), claim("sub", "equals", "{other}"))), ALICE, (),
            id="scope-and-not-owner",
        ),
    ],
)  # fmt: skip
def test_missing_scopes(cond: Condition, identity: Identity, expected: tuple[str, ...]) -> None:
    assert missing_scopes(cond, identity, P) == expected
    if expected:
        richer = identity.with_scopes(identity.scopes | frozenset(expected))
        assert cond.holds(richer, P) is True


def test_missing_scopes_leaves_identity_unchanged() -> None:
    missing_scopes(HasScope("write"), ALICE, P)
    assert ALICE.scopes == frozenset({"read"})


# --- describe -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cond", "text"),
    [
        pytest.param(Anyone(), "anyone", id="anyone"),
        pytest.param(Authenticated(), "authenticated", id="authenticated"),
        pytest.param(Nobody(), "nobody", id="nobody"),
        pytest.param(HasRole("admin"), "role admin", id="role"),
        pytest.param(HasScope("read"), "scope read", id="scope"),
        pytest.param(claim("org.id", "equals", "{id}"), "claim org.id equals '{id}'", id="equals"),
        pytest.param(claim("n", "in", [1, "a"]), "claim n in 1, 'a'", id="in"),
        pytest.param(AnyOf((Anyone(),)), "any of", id="any"),
        pytest.param(AllOf((Anyone(),)), "all of", id="all"),
        pytest.param(Not(Anyone()), "not", id="not"),
    ],
)
def test_describe(cond: Condition, text: str) -> None:
    assert cond.describe() == text


TREES = [
    # (condition, identity, params, lines)
    (HasRole("admin"), ALICE, {}, ["  role admin: false (roles: user)"]),
    (HasRole("admin"), None, {}, ["  role admin: false (no credentials)"]),
    (HasScope("write"), NO_SCOPES, {}, ["  scope write: false (scopes: none)"]),
    (Anyone(), None, {}, ["  anyone: true"]),
    (Nobody(), ADMIN, {}, ["  nobody: false"]),
    (Authenticated(), ALICE, {}, ["  authenticated: true"]),
    (claim("org.id", "equals", "{org}"), ALICE, {"org": "o2"},
     ["  claim org.id equals '{org}': false (wanted 'o2', org.id is 'o1')"]),
    (claim("tenant", "in", ["t1", "t2"]), ALICE, {},
     ["  claim tenant in 't1', 't2': true (tenant is 't1')"]),
    (claim("missing", "equals", 1), ALICE, {},
     ["  claim missing equals 1: false (missing is absent)"]),
    (claim("groups", "contains", "x" * 80), who(groups=["y" * 80]), {},
     [f"  claim groups contains '{'x' * 80}': false (groups is ['{'y' * 57}…)"]),
    (AnyOf((claim("sub", "equals", "{id}"), Not(HasRole("guest")))), ALICE, {"id": "bob"},
     ["  any of: true",
      "    claim sub equals '{id}': false (wanted 'bob', sub is 'alice')",
      "    not: true",
      "      role guest: false (roles: user)"]),
]  # fmt: skip


@pytest.mark.parametrize("cond, identity, params, lines", TREES)
def test_condition_tree(cond: Condition, identity: Identity | None, params: dict[str, str],
                        lines: list[str]) -> None:  # fmt: skip
    assert condition_tree(cond, identity, params) == lines
