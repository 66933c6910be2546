# tokexp: `make run` runs the main job, `make test` passes the tests. Both create/refresh the environment first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokexp-env-stamp
PROFILE ?= cpu
# Without a GPU, Triton kernels are exercised through Triton's interpreter, which must be chosen before triton is imported
TRITON_ENV := $(shell [ -e /dev/nvidia0 ] || echo TRITON_INTERPRET=1)

.PHONY: env sysdeps assets lms run test check-sync nbtest pytest site lab clean-site

env: $(STAMP) sysdeps

# torch is installed first and pinned (local CPU wheel via pip's find-links) so that nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@$(BIN)/python -c "import torch, sys; sys.exit('a CUDA torch build was installed; remove .venv and rerun' if torch.version.cuda else 0)"
	$(BIN)/python -m ipykernel install --sys-prefix --name tokexp --display-name "Python (tokexp)" >/dev/null
	@touch $(STAMP)

# headless Chromium for the site test (Debian package); installed only when missing and we can (root)
sysdeps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "warning: chromium not installed (apt-get install chromium) - the site test will fail"; }

assets: env
	$(BIN)/tokexp assets fetch

lms: env assets
	$(BIN)/tokexp lm train

run: env assets
	@rc=0; [ "$(PROFILE)" != cpu ] || $(BIN)/tokexp lm train || rc=$$?; \
	$(BIN)/tokexp run --profile $(PROFILE) || rc=$$?; \
	$(BIN)/tokexp site || rc=$$?; exit $$rc

site: env
	$(BIN)/tokexp site

check-sync: env
	$(BIN)/python scripts/check_sync.py

nbtest: env
	$(TRITON_ENV) $(BIN)/nbdev-test --n-workers 2

pytest: env assets
	$(BIN)/python -m pytest tests

test: env
	$(BIN)/python scripts/check_sync.py
	$(BIN)/tokexp assets fetch
	$(TRITON_ENV) $(BIN)/nbdev-test --n-workers 2
	$(BIN)/python -m pytest tests

lab: env
	$(BIN)/jupyter lab

clean-site:
	rm -rf _site _build _proc
