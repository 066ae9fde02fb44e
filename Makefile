# Two commands do all set-up on a fresh clone (Python 3.11+ and make only):
#   make run    serve on embedded defaults (SQLite + embedded Redis in ./data)
#   make test   run the test suite on embedded defaults
PYTHON ?= $(shell for p in python3.12 python3.11 python3.13 python3; do \
            command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            && echo $$p && break; done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test demo bench lint clean

$(STAMP): pyproject.toml verify/pyproject.toml
	@test -n "$(PYTHON)" || { echo "tessera needs Python 3.11 or newer on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ./verify'[fastapi]' -e '.[test]'
	@touch $@

install: $(STAMP)

# Local development is plain HTTP, so cookies are not Secure here (set TESSERA_COOKIE_SECURE=true
# behind TLS). Open http://$(HOST):$(PORT)/docs to try it.
run: install
	@if [ -z "$${TESSERA_SMTP_URL}" ]; then echo "mail: no TESSERA_SMTP_URL set; mails are written as .eml files to $${TESSERA_DATA_DIR:-./data}/outbox/ (open them with any mail reader)"; fi
	TESSERA_COOKIE_SECURE=$${TESSERA_COOKIE_SECURE:-false} $(BIN)/tessera serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The browser demo (examples/frontend): the static page on $(HOST):$(DEMO_PORT), another origin
# than tessera on $(HOST):$(PORT), which allows it with credentials (CORS). Ctrl-C stops both.
DEMO_PORT ?= 8080
demo: install
	@$(BIN)/python examples/frontend/serve.py --host $(HOST) --port $(DEMO_PORT) \
	    --api http://$(HOST):$(PORT) --wait 60 --quiet & page=$$!; \
	trap 'kill $$page 2>/dev/null' EXIT INT TERM; \
	TESSERA_COOKIE_SECURE=$${TESSERA_COOKIE_SECURE:-false} \
	TESSERA_CORS_ORIGINS=$${TESSERA_CORS_ORIGINS:-http://$(HOST):$(DEMO_PORT)} \
	TESSERA_PUBLIC_URL=$${TESSERA_PUBLIC_URL:-http://$(HOST):$(DEMO_PORT)} \
	$(BIN)/tessera serve --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/python -m pip install -q --disable-pip-version-check "ruff==0.17.6" "mypy==2.4.1"
	$(BIN)/ruff check src tests verify
	$(BIN)/mypy src verify/tessera_verify

# Load test (bench/run.sh; docs/performance.md): tessera serve pinned to CPU 0 with its own
# Redis, wrk on CPU 1; ~16 min. Needs 2 CPUs and wrk (apt-get install -y wrk). Results in
# bench/.run/results.md. Knobs: DURATION, RUNS, CONNS, SHARED=0, BENCH_DATABASE_URL, ...
bench: install
	@$(BIN)/python -m pip install -q py-spy || echo "no py-spy: the run will have no profile"
	VENV=$(VENV) bench/run.sh

clean:
	rm -rf $(VENV) data .pytest_cache
