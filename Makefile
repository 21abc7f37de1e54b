# The two commands of the README: `make up` runs Mercato, `make test` runs the tests.
.PHONY: up test bootstrap proto check lint

up: bootstrap
	.venv/bin/mercato up

test: bootstrap
	scripts/run-tests.sh

bootstrap:
	@scripts/bootstrap.sh

proto: bootstrap
	.venv/bin/python proto/generate.py

lint: bootstrap
	.venv/bin/ruff check coordinator node marketplace tests proto/generate.py
	.venv/bin/ruff format --check coordinator node marketplace tests proto/generate.py

check: lint test
