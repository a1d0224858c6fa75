# The two commands of the README. Both set everything up first (idempotent).
.PHONY: install demo test lint

install:
	bash deploy/install.sh

demo: install
	.venv/bin/kestrel demo --events 20000 --rate 1000

test: install
	bash deploy/test.sh

lint: install
	.venv/bin/ruff check .
