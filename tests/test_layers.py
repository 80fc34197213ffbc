"""The package's layers, as docs/architecture.md draws them, checked from the
imports themselves (an AST walk: nothing is imported to find out).

    cli.py  ->  tools/  ->  service/ | proxy/  ->  house/  ->  runtime/  ->  policy/  ->  core/

Each layer imports only the layers to its right, and the two doors (proxy/,
the mitmproxy addon; service/, the decision service) never import each
other; core imports no mitmproxy, yaml, asyncio or network I/O; only proxy/
and tools/ import mitmproxy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "addon" / "authgate"
ORDER = ("core", "policy", "runtime", "house", "proxy", "service", "tools")
DOORS = {"proxy", "service"}
# Third-party and standard modules a layer may not import (top-level names).
# (Module prefixes: `urllib.parse` and `http.HTTPStatus` are pure and allowed.)
_IO = ("asyncio", "threading", "subprocess", "urllib.request", "http.client", "http.server")
FORBIDDEN = {
    "core": ("mitmproxy", "yaml", "prometheus_client", *_IO),
    "policy": ("mitmproxy", "prometheus_client", *_IO),
    "runtime": ("mitmproxy",),
    "house": ("mitmproxy",),
    "service": ("mitmproxy",),
}
# The core converts addresses with socket's pure functions; it opens nothing.
CORE_SOCKET_NAMES = {"inet_pton", "inet_ntop", "AF_INET", "AF_INET6"}


def pure_socket(names: tuple[str, ...]) -> bool:
    return set(names) <= CORE_SOCKET_NAMES


def _layer(path: Path, package: Path) -> str:
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path, package: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, module, names imported from it) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[tuple[int, str, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative imports stay inside one layer's folder.
                parts = ["authgate", *path.relative_to(package).parts[: -node.level]]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module, tuple(a.name for a in node.names)))
    return out


def _violations(path: Path, package: Path = PACKAGE) -> list[str]:
    layer = _layer(path, package)
    found: list[str] = []
    for line, module, names in _imports(path, package):
        top = module.split(".")[0]
        where = f"{path.relative_to(package)}:{line}: {layer} imports {module}"
        if top == "authgate":
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if target == "" and names:
                targets = list(names)
            else:
                targets = [target]
            for t in targets:
                if layer in ORDER and t in ORDER and ORDER.index(t) > ORDER.index(layer):
                    found.append(where + f" (an upper layer: {t})")
                elif layer in DOORS and t in DOORS and t != layer:
                    found.append(where + f" (the other door: {t})")
                if layer in ORDER and t == "cli":
                    found.append(where + " (the command line)")
                if layer != "cli" and layer != "tools" and t == "tools":
                    found.append(where + " (tools/ is for cli.py only)")
        elif any(module == m or module.startswith(m + ".") for m in FORBIDDEN.get(layer, ())):
            found.append(where)
        elif (
            top == "socket" and layer == "core" and not (names and set(names) <= CORE_SOCKET_NAMES)
        ):
            found.append(where + f" (only {sorted(CORE_SOCKET_NAMES)})")
        elif top == "mitmproxy" and layer not in ("proxy", "tools"):
            found.append(where + " (only proxy/ and tools/ drive mitmproxy)")
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_follow_the_layers(path: Path) -> None:
    assert _violations(path) == []


def test_only_the_command_line_sits_at_the_top() -> None:
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top <= {"__init__.py", "__main__.py", "cli.py"}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        ORDER
    )


@pytest.mark.parametrize(
    "layer, source, broken",
    [
        ("core/x.py", "import mitmproxy.http\n", True),
        ("core/x.py", "from mitmproxy import http\n", True),
        ("core/x.py", "import yaml\n", True),
        ("core/x.py", "import asyncio\n", True),
        ("core/x.py", "import socket\n", True),
        ("core/x.py", "import urllib.request\n", True),
        ("core/x.py", "from urllib.parse import quote\n", False),
        ("core/x.py", "from socket import inet_pton, AF_INET\n", False),
        ("core/x.py", "from authgate.policy.load import load_policy\n", True),
        ("core/x.py", "from ..runtime import jwks\n", True),
        ("core/x.py", "from authgate.core.paths import canonicalize\n", False),
        ("policy/x.py", "import yaml\nfrom authgate.core.model import Policy\n", False),
        ("policy/x.py", "from authgate.runtime.jwks import RemoteKeys\n", True),
        ("runtime/x.py", "from mitmproxy import http\n", True),
        ("proxy/x.py", "from mitmproxy import http\n", False),
        ("proxy/x.py", "from authgate.tools.explain import explain\n", True),
        ("tools/x.py", "from mitmproxy import io\n", False),
        ("house/x.py", "from mitmproxy import http\n", True),
        ("house/x.py", "from authgate.proxy.addon import Gateway\n", True),
        ("proxy/x.py", "from authgate.house.gatehouse import Gatehouse\n", False),
        ("proxy/x.py", "from authgate.service.server import serve\n", True),
        ("service/x.py", "from authgate.proxy.addon import request_view\n", True),
        ("service/x.py", "from authgate.house.gatehouse import Gatehouse\n", False),
        ("service/x.py", "from mitmproxy import http\n", True),
        ("cli.py", "from authgate.tools.commands import check\n", False),
    ],
)
def test_the_rule_catches_what_it_should(
    tmp_path: Path, layer: str, source: str, broken: bool
) -> None:
    fake = tmp_path / "authgate"
    target = fake / layer
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    assert bool(_violations(target, fake)) is broken
