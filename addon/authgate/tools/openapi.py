"""`authgate import openapi`: a starting policy, and its tests, from an
OpenAPI 3.0 or 3.1 document.

The document says which operations exist and which security requirements
each has; it cannot say which keys verify a token or which API keys exist.
So the policy it writes is complete about routes and conditions and marks
every piece of key material with FILL-IN. Two rules hold throughout:

- Nothing is loosened. An operation whose security cannot be expressed
  exactly (an AND of two schemes, an API key in a cookie, a scheme authgate
  does not verify) becomes `allow: nobody`, and the problem is reported with
  the JSON pointer of its place in the document.
- What the document does not declare is not allowed: no rule matches a method
  a path does not declare, so it gets the unknown-path 404 (`default:
  not_found`), exactly like a path the document does not have.

The mapping is pure (`convert` takes the parsed document and returns texts and
problems); `main` reads and writes files for the command line.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from authgate.core.paths import PathPattern
from authgate.tools.testcases import beside

__all__ = ["Conversion", "Problem", "SpecError", "convert", "main", "pointer", "read_document"]

JWT, API_KEY, BASIC = "jwt", "api_key", "basic"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
FILL = "FILL-IN"
_OIDC_SUFFIX = "/.well-known/openid-configuration"
# Plain YAML scalars that stay strings; anything else is written quoted.
_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./-]*\Z")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
# Methods tried, in order, for a request that a path does not declare.
_UNDECLARED = ("DELETE", "PUT", "POST", "PATCH", "GET", "OPTIONS", "TRACE", "HEAD")

Cond = Any  # "anyone" | "authenticated" | "nobody" | {kind: ...}, as in the policy YAML


class SpecError(ValueError):
    """The document cannot be read at all (exit code 2)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Something the policy could not say faithfully, at a place in the document."""

    pointer: str  # JSON pointer, "#/paths/~1books/get/security/0"
    message: str


@dataclass(frozen=True, slots=True)
class Source:
    """A security scheme that maps onto an `authn` credential source."""

    scheme: str  # its name under components.securitySchemes
    kind: str  # jwt | api_key | basic
    scoped: bool  # oauth2/openIdConnect: requirement values are scopes, else roles
    header: str = ""  # api_key: the header
    issuer: str = ""  # jwt: the issuer URL (or a FILL-IN one)
    discovery: bool = False  # jwt: keys from the issuer's discovery document
    hints: tuple[str, ...] = ()  # what the document says about it, for comments


@dataclass(frozen=True, slots=True)
class Alternative:
    """One security requirement object with a single scheme: source + values."""

    source: Source
    values: tuple[str, ...]


@dataclass
class Operation:
    op_id: str  # operationId, or "METHOD /path"
    method: str  # upper case
    path: str  # as in the document
    pattern: str  # authgate pattern, base path included
    pointer: str
    name: str = ""  # the rule's name
    alternatives: tuple[Alternative, ...] | None = None  # None: anyone
    allow: Cond = "anyone"
    accept: tuple[str, ...] = ()
    denied_because: str = ""  # non-empty: left `allow: nobody`
    denied_at: str = ""  # the JSON pointer of the reason
    security_at: str = ""  # the JSON pointer of the security that applies


@dataclass
class Conversion:
    policy: str  # the policy YAML (with `tests:` when inline)
    tests: str  # the tests file YAML ("" when inline)
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    fill_in: list[str] = field(default_factory=list)


def pointer(*steps: str | int) -> str:
    """A JSON pointer (RFC 6901) as a URI fragment: `~` -> `~0`, `/` -> `~1`."""
    return "#" + "".join("/" + str(s).replace("~", "~0").replace("/", "~1") for s in steps)


def read_document(path: str) -> dict[str, Any]:
    """Parse an OpenAPI document (JSON or YAML). Raises SpecError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not UTF-8 text") from None
    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise SpecError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: an OpenAPI document is a mapping")
    version = doc.get("openapi")
    if not isinstance(version, str) or not re.match(r"^3\.[01]\.\d+", version):
        found = f"openapi: {version!r}" if "openapi" in doc else "no 'openapi' field"
        if "swagger" in doc:
            found = f"swagger: {doc['swagger']!r}"
        raise SpecError(f"{path}: not an OpenAPI 3.0 or 3.1 document ({found})")
    return doc


# --- YAML text --------------------------------------------------------------------


def _q(value: Any) -> str:
    """A YAML flow scalar for a string, number or bool."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _flow(value: Any) -> str:
    """A condition or test part as YAML flow text: `{all: [{scope: "a:b"}]}`."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if value is None:
        return "null"
    return _q(value)


# --- the document ------------------------------------------------------------------


class _Converter:
    def __init__(self, doc: dict[str, Any], spec: str, tests_inline: bool) -> None:
        self.doc = doc
        self.spec = spec
        self.inline = tests_inline
        self.problems: list[Problem] = []
        self.notes: list[Problem] = []
        self.sources: dict[str, Source] = {}  # by scheme name, in order of first use
        self.scheme_problems: dict[str, str] = {}  # scheme name -> why it cannot map
        self.api_key_header: str | None = None
        self.bases: list[str] = []  # the base paths in use, for the policy's comment

    def problem(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def resolve(self, value: Any, where: str) -> tuple[Any, str]:
        """Follow local `$ref`s (`#/components/...`); (value, its pointer)."""
        seen: set[str] = set()
        while isinstance(value, dict) and isinstance(value.get("$ref"), str):
            ref = value["$ref"]
            if not ref.startswith("#/") or ref in seen:
                raise LookupError(f"$ref {ref!r} is not a local reference this import follows")
            seen.add(ref)
            target: Any = self.doc
            for step in ref[2:].split("/"):
                step = urllib.parse.unquote(step).replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or step not in target:
                    raise LookupError(f"$ref {ref!r} points at nothing")
                target = target[step]
            value, where = target, ref
        return value, where

    # --- servers ------------------------------------------------------------------

    def base_path(self, servers: Any, where: str) -> str:
        """The base path of a `servers` list: the path part of each URL, with
        variables at their defaults. Several different ones: the first is used
        and the others are reported (their requests then match no rule: 404)."""
        if not isinstance(servers, list) or not servers:
            return ""
        bases: list[str] = []
        for i, server in enumerate(servers):
            if not isinstance(server, dict) or not isinstance(server.get("url"), str):
                self.problem(pointer(*_steps(where), i), "a server needs a url")
                continue
            url = server["url"]
            variables = server.get("variables") or {}
            for name, var in variables.items() if isinstance(variables, dict) else ():
                default = var.get("default") if isinstance(var, dict) else None
                url = url.replace("{" + name + "}", str(default))
                path_part = urllib.parse.urlsplit(server["url"]).path
                enum = var.get("enum") if isinstance(var, dict) else None
                if "{" + name + "}" in path_part and isinstance(enum, list) and len(enum) > 1:
                    self.problem(
                        pointer(*_steps(where), i, "variables", name),
                        f"the base path takes server variable {name!r} at its default "
                        f"{default!r} only; requests under its other values match no rule (404)",
                    )
            path = urllib.parse.urlsplit(url).path.rstrip("/")
            if path and not path.startswith("/"):
                path = "/" + path
            if path not in bases:
                bases.append(path)
        if bases and bases[0] and bases[0] not in self.bases:
            self.bases.append(bases[0])
        if len(bases) > 1:
            others = ", ".join(b or "/" for b in bases[1:])
            self.problem(
                where,
                f"servers have different base paths; rules use the first ({bases[0] or '/'}), "
                f"requests under {others} match no rule (404)",
            )
        return bases[0] if bases else ""

    # --- security schemes -----------------------------------------------------------

    def source(self, name: str) -> Source | str:
        """The credential source for a scheme name, or why there is none."""
        if name in self.sources:
            return self.sources[name]
        if name in self.scheme_problems:
            return self.scheme_problems[name]
        result = self._map_scheme(name)
        if isinstance(result, Source):
            self.sources[name] = result
        else:
            self.scheme_problems[name] = result
        return result

    def _map_scheme(self, name: str) -> Source | str:
        hints: tuple[str, ...]
        schemes = (self.doc.get("components") or {}).get("securitySchemes") or {}
        if not isinstance(schemes, dict) or name not in schemes:
            return f"security scheme {name!r} is not defined in components.securitySchemes"
        try:
            scheme, _where = self.resolve(schemes[name], pointer("components", "securitySchemes"))
        except LookupError as e:
            return f"security scheme {name!r}: {e}"
        if not isinstance(scheme, dict):
            return f"security scheme {name!r} is not a mapping"
        kind = scheme.get("type")
        if kind == "apiKey":
            place, header = scheme.get("in"), scheme.get("name")
            if place != "header":
                return (
                    f"apiKey {name!r} is sent in the {place}; authgate reads API keys "
                    "from a header only"
                )
            if not isinstance(header, str) or header.lower() in ("authorization", "cookie"):
                return f"apiKey {name!r} in header {header!r}: authgate cannot read keys there"
            if self.api_key_header not in (None, header.lower()):
                return (
                    f"apiKey {name!r} uses header {header}, but authgate reads API keys "
                    f"from one header and {self.api_key_header} is already taken"
                )
            self.api_key_header = header.lower()
            return Source(name, API_KEY, False, header=header)
        if kind == "http":
            http = str(scheme.get("scheme", "")).lower()
            if http == "bearer":
                fmt = scheme.get("bearerFormat")
                hints = ("http bearer",)
                if isinstance(fmt, str) and fmt.upper() != "JWT":
                    self.notes.append(Problem(
                        pointer("components", "securitySchemes", name),
                        f"bearerFormat {fmt!r}: authgate verifies JWTs only, other "
                        "tokens are refused",
                    ))  # fmt: skip
                    hints += (f"bearerFormat {fmt}",)
                return self._jwt(name, False, hints)
            if http == "basic":
                return Source(name, BASIC, False)
            return f"http scheme {http!r} of {name!r} is not one authgate verifies (bearer, basic)"
        if kind == "oauth2":
            hints = ("oauth2",)
            flows = scheme.get("flows")
            for flow_name, flow in flows.items() if isinstance(flows, dict) else ():
                for key in ("authorizationUrl", "tokenUrl"):
                    if isinstance(flow, dict) and isinstance(flow.get(key), str):
                        hints += (f"{flow_name} {key} {flow[key]}",)
            return self._jwt(name, True, hints)
        if kind == "openIdConnect":
            url = scheme.get("openIdConnectUrl")
            hints = ("openIdConnect", f"openIdConnectUrl {url}")
            if isinstance(url, str) and url.rstrip("/").endswith(_OIDC_SUFFIX):
                issuer = url.rstrip("/").removesuffix(_OIDC_SUFFIX)
                if issuer.startswith("https://"):
                    return Source(name, JWT, True, issuer=issuer, discovery=True, hints=hints)
            return self._jwt(name, True, hints)
        if kind == "mutualTLS":
            return f"mutualTLS {name!r}: authgate does not verify client certificates"
        return f"security scheme {name!r} has type {kind!r}, which authgate does not verify"

    def _jwt(self, name: str, scoped: bool, hints: tuple[str, ...]) -> Source:
        issuer = f"https://{FILL}.invalid/{urllib.parse.quote(name, safe='')}"
        return Source(name, JWT, scoped, issuer=issuer, hints=hints)

    # --- requirements -----------------------------------------------------------

    def alternatives(self, security: Any, where: str) -> tuple[Alternative, ...] | None | Problem:
        """None: anyone; else the alternatives; a Problem: where and why they cannot map."""
        if not isinstance(security, list):
            return Problem(where, "security must be a list of security requirement objects")
        if not security or any(r == {} for r in security):
            return None  # no requirement, or an empty one: anonymous access is declared
        out: list[Alternative] = []
        for i, req in enumerate(security):
            at = f"{where}/{i}"
            if not isinstance(req, dict):
                return Problem(at, "a security requirement must be a mapping")
            if len(req) > 1:
                return Problem(
                    at,
                    f"requires {' AND '.join(req)} together; a request carries one "
                    "credential, so authgate cannot require two schemes at once",
                )
            ((name, values),) = req.items()
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                return Problem(at, f"the value of {name!r} must be a list of strings")
            source = self.source(name)
            if isinstance(source, str):
                return Problem(at, source)
            if any(not v or re.search(r"[\s\"\\]", v) for v in values):
                return Problem(
                    at, f"a scope or role of {name!r} is empty or holds a space, quote or backslash"
                )
            out.append(Alternative(source, tuple(values)))
        return tuple(out)

    def condition(self, op: Operation, issuers: Sequence[Source]) -> None:
        """Set op.allow and op.accept from its alternatives (or deny it)."""
        alts = op.alternatives
        if alts is None:
            op.allow = "anyone"
            return
        kinds = {a.source.kind for a in alts}
        # A condition cannot see which kind of credential the caller used, so
        # alternatives of different kinds (and of different JWT issuers) are
        # each guarded: JWT ones by their `iss`, the others by having no `iss`
        # of a configured issuer (API-key and Basic identities carry none).
        guard_jwt = len(issuers) > 1 or bool(kinds - {JWT})
        all_iss = [s.issuer for s in issuers]
        by_kind: dict[str, list[Cond]] = {}
        for alt in alts:
            parts: list[Cond] = []
            if alt.source.kind == JWT and guard_jwt:
                parts.append({"claim": "iss", "equals": alt.source.issuer})
            if alt.source.kind != JWT and JWT in kinds:
                parts.append({"not": {"claim": "iss", "in": all_iss}})
            word = "scope" if alt.source.scoped else "role"
            parts += [{word: v} for v in alt.values]
            cond: Cond = parts[0] if len(parts) == 1 else {"all": parts} if parts else None
            by_kind.setdefault(alt.source.kind, [])
            if cond not in by_kind[alt.source.kind]:
                by_kind[alt.source.kind].append(cond)
        if API_KEY in by_kind and BASIC in by_kind and by_kind[API_KEY] != by_kind[BASIC]:
            op.denied_at = op.security_at
            op.denied_because = (
                "alternatives of an API key and of Basic with different roles: a condition "
                "cannot tell the two kinds of caller apart"
            )
            op.allow = "nobody"
            return
        conds: list[Cond] = []
        for kind_conds in by_kind.values():
            for cond in kind_conds:
                cond = "authenticated" if cond is None else cond
                if cond not in conds:
                    conds.append(cond)
        if "authenticated" in conds:
            conds = ["authenticated"]  # it holds whenever any of the others does
        op.allow = conds[0] if len(conds) == 1 else {"any": conds}
        op.accept = tuple(k for k in (JWT, API_KEY, BASIC) if k in kinds)

    # --- paths --------------------------------------------------------------------

    def pattern(self, path: str, base: str) -> str:
        """The authgate pattern of an OpenAPI path template, base path prepended;
        raises ValueError when a segment cannot be expressed."""
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with '/'")
        segments = []
        for seg in (base + path).split("/")[1:]:
            if re.fullmatch(r"\{[^{}/]+\}", seg):
                # `*`: one whole segment. The name stays in the rule's comment;
                # write `{name}` when a condition needs its value.
                segments.append("*")
            elif "{" in seg or "}" in seg:
                raise ValueError(
                    f"segment {seg!r} mixes a template with text; authgate patterns "
                    "take whole segments only"
                )
            else:
                segments.append(seg)
        text = "/" + "/".join(segments)
        PathPattern.parse(text)  # ValueError for what authgate refuses (dot segments, %2F)
        return text

    def operations(self) -> tuple[list[Operation], list[str]]:
        """Every operation of the document (doc order), and comments for skipped ones."""
        ops: list[Operation] = []
        skipped: list[str] = []
        top_base = self.base_path(self.doc.get("servers"), pointer("servers"))
        paths = self.doc.get("paths") or {}
        if not isinstance(paths, dict):
            raise SpecError("paths must be a mapping")
        global_security = self.doc.get("security", [])
        for path, item in paths.items():
            item_where = pointer("paths", path)
            try:
                item, _ = self.resolve(item, item_where)
            except LookupError as e:
                self.problem(item_where, f"{e}; the path is left out (404)")
                skipped.append(f"{path}: {e}")
                continue
            if not isinstance(item, dict):
                continue
            base = top_base
            if "servers" in item:
                base = self.base_path(item["servers"], pointer("paths", path, "servers"))
            for method in METHODS:
                if method not in item or not isinstance(item[method], dict):
                    continue
                spec = item[method]
                where = pointer("paths", path, method)
                op_id = spec.get("operationId")
                op_id = op_id if isinstance(op_id, str) and op_id else f"{method.upper()} {path}"
                op_base = base
                if "servers" in spec:
                    op_base = self.base_path(spec["servers"], f"{where}/servers")
                try:
                    pattern = self.pattern(path, op_base)
                except ValueError as e:
                    self.problem(where, f"{e}; operation {op_id} is left out (404)")
                    skipped.append(f"{op_id}: {method.upper()} {path}: {e}")
                    continue
                op = Operation(op_id, method.upper(), path, pattern, where)
                if "security" in spec:
                    security, sec_where = spec["security"], f"{where}/security"
                else:
                    security, sec_where = global_security, pointer("security")
                    if "security" not in self.doc:
                        self.notes.append(Problem(
                            where,
                            f"no security declared (here or globally): {op_id} is "
                            "allowed to anyone, as the document says",
                        ))  # fmt: skip
                op.security_at = sec_where
                found = self.alternatives(security, sec_where)
                if isinstance(found, Problem):
                    op.denied_at, op.denied_because = found.pointer, found.message
                else:
                    op.alternatives = found
                ops.append(op)
        return ops, skipped


def _steps(where: str) -> list[str]:
    return [s.replace("~1", "/").replace("~0", "~") for s in where.removeprefix("#/").split("/")]


def _parts(pattern: str) -> list[str | None]:
    return [None if s == "*" else s for s in pattern.split("/")[1:] if s]


def _overlap(a: str, b: str) -> bool:
    pa, pb = _parts(a), _parts(b)
    return len(pa) == len(pb) and all(
        x is None or y is None or x == y for x, y in zip(pa, pb, strict=True)
    )


def _before(a: str, b: str) -> bool:
    """a must come before b: at the first segment where one is literal and the
    other templated, a is the literal one (OpenAPI matches concrete paths first)."""
    for x, y in zip(_parts(a), _parts(b), strict=False):
        if (x is None) != (y is None):
            return y is None
    return False


def order(ops: Iterable[Operation]) -> list[Operation]:
    """Document order, except that an operation moves before the first
    overlapping one that is more templated than it (first match wins)."""
    out: list[Operation] = []
    for op in ops:
        at = next(
            (
                i
                for i, other in enumerate(out)
                if _overlap(op.pattern, other.pattern) and _before(op.pattern, other.pattern)
            ),
            len(out),
        )
        out.insert(at, op)
    return out


def _unique_names(ops: list[Operation]) -> None:
    seen: set[str] = set()
    for op in ops:
        name, n = op.op_id, 2
        while name in seen:
            name, n = f"{op.op_id}-{n}", n + 1
        seen.add(name)
        op.name = name


def _first_rule(ops: list[Operation], method: str, path: str) -> Operation | None:
    """Which of our rules a request would match (first match, in rule order)."""
    segments = tuple(s for s in path.split("/")[1:] if s)
    for op in ops:
        if op.method == method and PathPattern.parse(op.pattern).match(segments) is not None:
            return op
    return None


def _sample_path(ops: list[Operation], op: Operation) -> str | None:
    """A concrete path that `op`'s rule (and no earlier one) decides."""
    for value in ("sample", "sample-1", "sample-2", "x0"):
        path = op.pattern.replace("*", value)
        if _first_rule(ops, op.method, path) is op:
            return path
    return None


# --- output ------------------------------------------------------------------------


def _issuer_lines(s: Source) -> list[str]:
    lines = [f"    # securitySchemes.{s.scheme}: {'; '.join(s.hints)}"]
    lines.append(f"    - name: {_q(s.scheme)}")
    if s.discovery:
        lines.append(f"      issuer: {_q(s.issuer)}   # from openIdConnectUrl")
        lines.append(f"      audience: {FILL}-audience   # FILL IN: the aud of its tokens")
        lines.append("      algorithms: [RS256]   # FILL IN if the provider signs otherwise")
        lines.append("      discovery: true   # keys from the issuer's jwks_uri")
        return lines
    for hint in s.hints:
        if "tokenUrl" in hint or "authorizationUrl" in hint:
            origin = urllib.parse.urlsplit(hint.split()[-1])
            lines.append(f"      # issuer hint: tokens come from {origin.scheme}://{origin.netloc}")
            break
    lines.append(f"      issuer: {_q(s.issuer)}   # FILL IN: the iss of its tokens")
    lines.append(f"      audience: {FILL}-audience   # FILL IN: the aud of its tokens")
    lines.append("      algorithms: [RS256]   # FILL IN if the provider signs otherwise")
    lines.append(
        f"      jwks_file: keys/{_file_name(s.scheme)}.jwks.json   # FILL IN: this file "
        "(the provider's JWKS), or jwks_url: / discovery: true"
    )
    return lines


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


class _Writer:
    def __init__(self, c: _Converter, ops: list[Operation], skipped: list[str], stem: str) -> None:
        self.c = c
        self.ops = ops
        self.skipped = skipped
        self.stem = stem
        self.fill_in: list[str] = []
        # A path whose methods an overlapping, more templated rule below would
        # otherwise judge (DELETE /books/featured by the /books/* rule) gets a
        # closing rule after its own: hidden and for nobody, so a method it does
        # not declare is the unknown-path 404. Keyed by the index of the first
        # op it must precede.
        self.closers: dict[int, list[str]] = {}
        self.closer_names: dict[str, str] = {}
        names = {op.name for op in ops}
        for i, op in enumerate(ops):
            for earlier in ops[:i]:
                p = earlier.pattern
                if p != op.pattern and p not in self.closer_names and _overlap(p, op.pattern):
                    name, n = f"{p} other methods", 2
                    while name in names:
                        name, n = f"{p} other methods {n}", n + 1
                    names.add(name)
                    self.closer_names[p] = name
                    self.closers.setdefault(i, []).append(p)

    def policy(self) -> list[str]:
        c, doc = self.c, self.c.doc
        info: dict[str, Any] = doc["info"] if isinstance(doc.get("info"), dict) else {}
        title = f"{info.get('title', '')} {info.get('version', '')}".strip()
        out = [
            f"# Generated by `authgate import openapi {c.spec}` (OpenAPI {doc['openapi']}"
            + (f", {title})." if title else ")."),
            "# A starting point: review every rule. FILL-IN marks what the document",
            "# cannot know (keys, audiences); `authgate check` names what is missing.",
            "# One rule per operation, named by its operationId. Path templates become",
            "# `*` (one segment; write {name} where a condition needs the value).",
            "# Rules match first to last: a path with a literal segment comes before a",
            "# templated one that would also match it, as OpenAPI matches concrete",
            "# paths first. A method a path does not declare is 404: it matches no rule,",
            "# or, where a templated rule below would match it, a hidden rule for nobody.",
        ]
        if self.c.bases:
            out.append(
                f"# Base path: {', '.join(self.c.bases)} (from servers) is prepended to every path."
            )
        if isinstance(doc.get("webhooks"), dict) and doc["webhooks"]:
            out.append(
                f"# webhooks ({', '.join(map(str, doc['webhooks']))}) are requests this API "
                "sends, not routes: left out."
            )
        out += ["version: 1"]
        out += self.authn()
        out.append("rules:")
        if not self.ops:
            out[-1] = "rules: []"
        for i, op in enumerate(self.ops):
            for pattern in self.closers.get(i, ()):
                out += self.closer(pattern)
            out += self.rule(op)
        for text in self.skipped:
            out.append(f"  # left out (no rule, so 404): {text}")
        out.append("default: not_found")
        return out

    def authn(self) -> list[str]:
        sources = self.used_sources()
        if not sources:
            return []
        out = ["authn:"]
        jwts = [s for s in sources if s.kind == JWT]
        if jwts:
            out.append("  jwt:")
            if len(jwts) > 1 or any(s.kind != JWT for s in sources):
                out.append(
                    "    # The rules check `iss` against these issuers: change both together."
                )
            for s in jwts:
                out += _issuer_lines(s)
                if not s.discovery:
                    self.fill_in.append(
                        f"authn.jwt {s.scheme}: create keys/{_file_name(s.scheme)}.jwks.json "
                        "beside the policy (or use jwks_url/discovery), and set issuer and audience"
                    )
                else:
                    self.fill_in.append(f"authn.jwt {s.scheme}: set audience (and algorithms)")
        keys = [s for s in sources if s.kind == API_KEY]
        if keys:
            out.append(f"  # securitySchemes.{keys[0].scheme}: apiKey in header {keys[0].header}")
            out.append("  api_keys:")
            out.append(f"    header: {_q(keys[0].header)}")
            out.append("    keys:   # FILL IN: one entry a client; `authgate hash-key --generate`")
            roles = self.roles_of(API_KEY)
            extra = f", roles: {_flow(roles)}" if roles else ""
            out.append(f"      - {{name: {FILL}, sha256: {FILL}{extra}}}")
            self.fill_in.append(
                "authn.api_keys: the keys' names and sha256 digests (`authgate hash-key`)"
            )
        basics = [s for s in sources if s.kind == BASIC]
        if basics:
            out.append(f"  # securitySchemes.{basics[0].scheme}: http basic")
            out.append("  basic:")
            out.append(
                f"    htpasswd: {_q(self.stem + '.htpasswd')}   # FILL IN: this file "
                "(bcrypt: htpasswd -B)"
            )
            roles = self.roles_of(BASIC)
            if roles:
                out.append("    users:   # FILL IN: which users have the roles the document names")
                out.append(f"      {FILL}: {{roles: {_flow(roles)}}}")
            self.fill_in.append(
                f"authn.basic: create {self.stem}.htpasswd beside the policy (bcrypt)"
            )
        return out

    def roles_of(self, kind: str) -> list[str]:
        roles: list[str] = []
        for op in self.ops:
            for alt in op.alternatives or ():
                if alt.source.kind == kind:
                    roles += [v for v in alt.values if v not in roles]
        return roles

    def used_sources(self) -> list[Source]:
        used: list[Source] = []
        for op in self.ops:
            for alt in op.alternatives or ():
                if alt.source not in used:
                    used.append(alt.source)
        return sorted(used, key=lambda s: list(self.c.sources).index(s.scheme))

    def rule(self, op: Operation) -> list[str]:
        out = [f"  # {op.op_id}: {op.method} {op.path}"]
        if op.denied_because:
            out.append("  # DENIED: not mapped faithfully (see the report), so nobody may call it")
        out.append(f"  - name: {_q(op.name)}")
        out.append(f"    match: {{path: {_q(op.pattern)}, methods: [{op.method}]}}")
        if op.accept:
            out.append(f"    accept: [{', '.join(op.accept)}]")
        out.append(f"    allow: {_flow(op.allow)}")
        return out

    def closer(self, pattern: str) -> list[str]:
        declared = sorted({op.method for op in self.ops if op.pattern == pattern})
        return [
            f"  # {pattern} declares only {', '.join(declared)}: any other method is the",
            "  # unknown-path 404, never the more templated rule below",
            f"  - name: {_q(self.closer_names[pattern])}",
            f"    match: {{path: {_q(pattern)}}}",
            "    allow: nobody",
            "    hide: true",
        ]

    # --- tests ------------------------------------------------------------------

    def tests(self) -> list[str]:
        out: list[str] = []
        for op in self.ops:
            out += self.op_tests(op)
        for pattern, name in self.closer_names.items():
            declared = {op.method for op in self.ops if op.pattern == pattern}
            method = next(m for m in _UNDECLARED if m not in declared)
            request = {"method": method, "path": pattern.replace("*", "sample")}
            out += _case(f"{name}: {method} is not declared", request, None, 404, name)
        return out

    def op_tests(self, op: Operation) -> list[str]:
        path = _sample_path(self.ops, op)
        if path is None:
            return [f"  # {op.name}: no path that only this rule decides, no tests"]
        out: list[str] = []
        request = {"method": op.method, "path": path}
        configured = bool(self.used_sources())
        if op.denied_because:
            status = 401 if configured else 403
            out += _case(f"{op.name}: left denied", request, None, status, op.name)
            return out
        if op.allow == "anyone":
            out += _case(f"{op.name}: anyone may call it", request, None, 200, op.name)
            other = next((m for m in _UNDECLARED if _first_rule(self.ops, m, path) is None), None)
            if other is not None and op.pattern not in self.closer_names:
                denied = {"method": other, "path": path}
                name = f"{op.name}: {other} is not declared on {op.path}"
                out += _case(name, denied, None, 404, None)
            return out
        assert op.alternatives
        alts = sorted(op.alternatives, key=lambda a: a.source.kind != JWT)
        alt = alts[0]
        token, headers = self.credentials(alt)
        req = {**request, "headers": headers} if headers else request
        out += _case(f"{op.name}: allowed {_as(alt)}", req, token, 200, op.name)
        # Denied: a token of the same issuer without the scopes or roles, when no
        # alternative is satisfied by such a token; else no credentials at all.
        bare_ok = any(a.source == alt.source and not a.values for a in op.alternatives)
        if alt.source.kind == JWT and alt.values and not bare_ok:
            bare = {"issuer": alt.source.scheme} if len(self.jwt_sources()) > 1 else {}
            out += _case(
                f"{op.name}: a token without {' '.join(alt.values)} is refused",
                request, bare or {"sub": "test-user"}, 403, op.name,
            )  # fmt: skip
        else:
            out += _case(f"{op.name}: no credentials is 401", request, None, 401, op.name)
        return out

    def jwt_sources(self) -> list[Source]:
        return [s for s in self.used_sources() if s.kind == JWT]

    def credentials(self, alt: Alternative) -> tuple[dict[str, Any] | None, dict[str, str]]:
        s = alt.source
        if s.kind == JWT:
            token: dict[str, Any] = {}
            if len(self.jwt_sources()) > 1:
                token["issuer"] = s.scheme
            if alt.values:
                token["scopes" if s.scoped else "roles"] = list(alt.values)
            return token or {"sub": "test-user"}, {}
        if s.kind == API_KEY:
            return None, {s.header: f"{FILL}-test-key"}
        return None, {"Authorization": f"Basic {FILL}-base64-of-user:password"}


def _as(alt: Alternative) -> str:
    what = {JWT: "with a token", API_KEY: "with an API key", BASIC: "with Basic"}[alt.source.kind]
    if alt.values:
        what += f" having {' '.join(alt.values)}"
    return what


def _case(name: str, request: dict[str, Any], token: dict[str, Any] | None,
          status: int, rule: str | None) -> list[str]:  # fmt: skip
    out = [f"  - name: {_q(name)}", f"    request: {_flow(request)}"]
    if token is not None:
        out.append(f"    token: {_flow(token)}")
    out.append(f"    expect: {_flow({'status': status, 'rule': rule})}")
    return out


def convert(doc: dict[str, Any], spec: str = "SPEC", stem: str = "policy",
            tests_inline: bool = True) -> Conversion:  # fmt: skip
    """The policy (and tests) for a parsed document. `stem` names files the
    policy refers to (`STEM.htpasswd`); `tests_inline` puts the tests under
    the policy's `tests:` instead of a separate text. Raises SpecError."""
    c = _Converter(doc, spec, tests_inline)
    ops, skipped = c.operations()
    ops = order(ops)
    _unique_names(ops)
    # The conditions depend on which issuers the policy has; an operation
    # denied while building them may take its issuer out, so build until stable.
    issuers: list[Source] | None = None
    while issuers != _jwt_in_use(ops):
        issuers = _jwt_in_use(ops)
        for op in ops:
            if not op.denied_because:
                c.condition(op, issuers)
    for op in ops:
        if op.denied_because:
            op.allow, op.accept, op.alternatives = "nobody", (), ()
            c.problem(
                op.denied_at or op.pointer,
                f"{op.denied_because}; operation {op.op_id} ({op.method} {op.path}) is left denied",
            )
    w = _Writer(c, ops, skipped, stem)
    policy = w.policy()
    tests = w.tests()
    header = [
        "# Tests generated with the policy: one allowed and one denied request per",
        "# operation. Tokens are signed by `authgate test` with a throwaway key;",
        f"# API keys and Basic credentials marked {FILL} are yours to provide",
        "# (a test key whose digest is in the policy).",
    ]
    if tests_inline:
        policy += header + (["tests:"] + tests if tests else ["tests: []"])
        return Conversion("\n".join(policy) + "\n", "", c.problems, c.notes, w.fill_in)
    tests_text = header + (["tests:"] + tests if tests else ["tests: []"])
    return Conversion(
        "\n".join(policy) + "\n", "\n".join(tests_text) + "\n", c.problems, c.notes, w.fill_in
    )


def _jwt_in_use(ops: list[Operation]) -> list[Source]:
    """The JWT sources of the operations that are not denied, in order of first use."""
    out: list[Source] = []
    for op in ops:
        for alt in op.alternatives or ():
            if not op.denied_because and alt.source.kind == JWT and alt.source not in out:
                out.append(alt.source)
    return out


def main(spec: str, output: str | None) -> int:
    """The command: 0 all mapped, 1 something could not be (see stderr), 2 unreadable."""
    try:
        doc = read_document(spec)
        stem = Path(output).name.removesuffix(".yaml").removesuffix(".yml") if output else "policy"
        result = convert(doc, spec, stem, tests_inline=output is None)
    except SpecError as e:
        print(f"authgate import openapi: {e}", file=sys.stderr)
        return 2
    if output is None:
        sys.stdout.write(result.policy)
    else:
        tests_path = beside(output)
        try:
            Path(output).write_text(result.policy, encoding="utf-8")
            tests_path.write_text(result.tests, encoding="utf-8")
        except OSError as e:
            print(f"authgate import openapi: cannot write {e.filename}: {e.strerror}",
                  file=sys.stderr)  # fmt: skip
            return 2
        print(f"authgate import openapi: wrote {output} and {tests_path}", file=sys.stderr)
    for p in result.problems:
        print(f"{spec}{p.pointer}: {p.message}", file=sys.stderr)
    for note in result.notes:
        print(f"{spec}{note.pointer}: note: {note.message}", file=sys.stderr)
    for item in result.fill_in:
        print(f"fill in: {item}", file=sys.stderr)
    return 1 if result.problems else 0
