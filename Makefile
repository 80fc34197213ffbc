# authgate: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-mitmproxy12 redis-server proxies oidc-provider chromium lint fix typecheck check bench bench-workers bench-instructions screenshots clean

install: $(STAMP) policies/keys/jwks.json policies/keys/session-keys

$(STAMP): pyproject.toml
	@echo "authgate: installing into $(VENV) (about a minute the first time)..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The demo key pair the example policies and `authgate token` use (and the
# demo client secret and session key of policies/oidc-login.yaml).
policies/keys/jwks.json policies/keys/session-keys: | $(STAMP)
	$(BIN)/authgate demo-keys policies/keys

# make run ARGS="--listen 127.0.0.1:18080 --backend 127.0.0.1:19000"
run: install
	$(BIN)/authgate demo $(ARGS)

test: install redis-server proxies oidc-provider chromium
	$(BIN)/python -m pytest
	@$(MAKE) --no-print-directory test-mitmproxy12

# mitmproxy 12 needs Python 3.12: when one is here (python3.12 on the PATH, or a
# pyenv 3.12), the whole suite runs again on it, in .venv312. Without one, this
# says so and the suite has run on mitmproxy 11 alone.
VENV312 ?= .venv312
test-mitmproxy12:
	@py=""; \
	  if python3.12 -c "" 2>/dev/null; then py="python3.12"; \
	  elif command -v pyenv >/dev/null; then \
	    v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$$' | tail -1); \
	    if [ -n "$$v" ]; then py="$$(pyenv prefix $$v)/bin/python3"; fi; \
	  fi; \
	  if [ -z "$$py" ]; then \
	    echo "authgate: no Python 3.12 here: the suite ran on mitmproxy 11 only"; exit 0; \
	  fi; \
	  if [ ! -f $(VENV312)/.installed ] || [ pyproject.toml -nt $(VENV312)/.installed ]; then \
	    echo "authgate: installing into $(VENV312) for mitmproxy 12 ($$py)..."; \
	    test -x $(VENV312)/bin/python || $$py -m venv $(VENV312); \
	    $(VENV312)/bin/python -m pip install -q --upgrade pip && \
	    $(VENV312)/bin/python -m pip install -q -e '.[dev]' && touch $(VENV312)/.installed; \
	  fi; \
	  echo "authgate: the suite again, on $$($(VENV312)/bin/python -c 'import sys, mitmproxy.version as v; print(f"mitmproxy {v.VERSION}, Python {sys.version.split()[0]}")')"; \
	  $(VENV312)/bin/python -m pytest

# The tests start their own redis-server (Debian package redis-server) on a free
# loopback port; install it when missing (as root), else say how.
redis-server:
	@command -v redis-server >/dev/null || \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; \
	  else \
	    echo "authgate: the tests need redis-server: sudo apt-get install redis-server" >&2; \
	    exit 1; \
	  fi

# tests/test_service_proxies.py runs Debian's nginx (its auth_request module)
# and caddy in front of `authgate serve`; install them when missing (as root),
# else say how.
proxies:
	@missing=""; \
	  command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="nginx"; \
	  command -v caddy >/dev/null || missing="$${missing:+$$missing }caddy"; \
	  if [ -z "$$missing" ]; then exit 0; fi; \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	  else \
	    echo "authgate: the tests need $$missing: sudo apt-get install $$missing" >&2; \
	    exit 1; \
	  fi

# The login and introspection tests start a real OpenID provider: panva's
# oidc-provider (OpenID Certified) from the npm registry, pinned in
# tests/oidc/package-lock.json. Node.js and npm (Debian packages nodejs, npm)
# are installed when missing (as root), else the command says how.
oidc-provider:
	@command -v npm >/dev/null || \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm; \
	  else \
	    echo "authgate: the tests need Node.js and npm: sudo apt-get install nodejs npm" >&2; \
	    exit 1; \
	  fi
	@test -d tests/oidc/node_modules/oidc-provider || \
	  npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error

# tests/test_login_chromium.py signs in with Debian's chromium, headless, driven
# by Playwright (the dev extra; no browser download: it runs /usr/bin/chromium).
# Install it when missing (as root), else say how.
chromium:
	@test -x /usr/bin/chromium || \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "authgate: the tests need Debian's chromium: sudo apt-get install chromium" >&2; \
	    exit 1; \
	  fi

lint: install
	$(BIN)/ruff check addon tests
	$(BIN)/ruff format --check addon tests
	$(BIN)/mypy

fix: install
	$(BIN)/ruff check --fix addon tests
	$(BIN)/ruff format addon tests

typecheck: install
	$(BIN)/mypy

check: lint test

# make bench ARGS="--rounds 5 --duration 10" (all options: ARGS=--help)
bench: install
	$(BIN)/python -m authgate.tools.bench $(ARGS)

# --workers 2 beside --workers 1 under wrk: req/s and CPU per request (needs wrk).
bench-workers: install
	$(BIN)/python -m authgate.tools.bench_workers $(ARGS)

# Instructions per request under valgrind: steady on a busy machine (needs valgrind).
bench-instructions: install
	$(BIN)/python -m authgate.tools.bench_instructions $(ARGS)

# The docs' screenshots (needs Debian's chromium).
screenshots: install
	bash docs/images/make.sh

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache .mypy_cache .ruff_cache build *.egg-info addon/*.egg-info
