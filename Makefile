# Two commands on a fresh clone; each makes its own virtual environment (.venv).
#   make demo   the one-minute tour: sandbox + daemon on SQLite, a few hundred deltas, faults, the report
#   make test   the test suite (PostgreSQL tests too when PACRECON_TEST_DATABASE_URL is set)
# and
#   make run    the daemon on SQLite with the local PacSpace sandbox, staying up (writes a development .env)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo run test venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/pacrecon demo

run: venv
	@test -f .env || { \
	  printf 'PACRECON_WEBHOOK_SECRETS=whsec_dev_%s\nPACRECON_API_TOKEN=dev_%s\nPACRECON_PACSPACE_BASE_URL=http://127.0.0.1:8090\nPACRECON_PACSPACE_API_KEY=sk_sandbox_local\n' \
	    "$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(16))')" \
	    "$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(16))')" > .env; \
	  echo "wrote a development configuration to .env:"; cat .env; }
	$(BIN)/pacrecon migrate
	@secret=$$(sed -n 's/^PACRECON_WEBHOOK_SECRETS=//p' .env | cut -d, -f1); \
	port=$$(sed -n 's/^PACRECON_PORT=//p' .env); port=$${port:-8080}; \
	$(BIN)/pacrecon sandbox --port 8090 --webhook-url "http://127.0.0.1:$$port/webhooks/pacspace" --webhook-secret "$$secret" & \
	sandbox=$$!; trap 'kill $$sandbox 2>/dev/null; wait $$sandbox 2>/dev/null' EXIT INT TERM; \
	$(BIN)/pacrecon serve

test: venv
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
