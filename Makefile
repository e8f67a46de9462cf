# Two commands on a fresh clone; each makes its own virtual environment (.venv).
#   make run    the daemon on SQLite (writes a development webhook secret to .env)
#   make test   the test suite (PostgreSQL tests too when PACRECON_TEST_DATABASE_URL is set)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

run: venv
	@test -f .env || { printf 'PACRECON_WEBHOOK_SECRETS=whsec_dev_%s\n' "$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(16))')" > .env; \
	  echo "wrote a development webhook secret to .env:"; cat .env; }
	$(BIN)/pacrecon migrate
	$(BIN)/pacrecon serve

test: venv
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
