# The two commands a newcomer runs: `make up` (the whole stack) and `make test`.
VENV ?= .venv
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: bootstrap test-tools up test lint

bootstrap:
	@bash scripts/bootstrap.sh

up: bootstrap
	$(VENV)/bin/triage up $(ARGS)

# test-only: PostgreSQL and the Prisma engine stand-in for LiteLLM's database keys (tests/prisma_engine)
test-tools: bootstrap
	@bash scripts/install_prisma_standin.sh $(VENV)

test: bootstrap test-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest $(ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
