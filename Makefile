# tokexp: `make run` runs the main job, `make test` passes the tests. Both create/refresh the environment first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokexp-env-stamp
PROFILE ?= cpu
# Without a GPU, Triton kernels are exercised through Triton's interpreter, which must be chosen before triton is imported
TRITON_ENV := $(shell [ -e /dev/nvidia0 ] || echo TRITON_INTERPRET=1)

.PHONY: env lock sysdeps assets lms run test check-sync nbtest pytest site lab clean-site

env: $(STAMP) sysdeps

# The environment: torch first (outside the lock: the CPU wheel where pip can find one - here a local file through
# pip's find-links -, otherwise whatever build pip resolves, CUDA on a GPU box; TORCH_PIP_ARGS="--index-url
# https://download.pytorch.org/whl/cpu" asks for the CPU build elsewhere), then every other dependency at the exact,
# hash-checked versions of requirements.lock, then the package itself without resolving anything, then `pip check`.
TORCH_PIP_ARGS ?=
LOCK := requirements.lock
PIP := $(BIN)/pip install -q --disable-pip-version-check
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || { $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
	  || { echo "requirements.lock is for CPython 3.11, but '$(PY)' is $$($(PY) --version 2>&1 || echo missing): run with PY=python3.11 (e.g. make test PY=python3.11)"; exit 1; }; \
	  $(PY) -m venv $(VENV); }
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
	  || { echo "$(VENV) runs $$($(BIN)/python --version), but requirements.lock is for CPython 3.11: remove $(VENV) and rerun with PY=python3.11"; exit 1; }
	$(PIP) torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PIP) --no-deps --require-hashes -r $(LOCK)
	$(PIP) --no-deps --no-build-isolation -e .
	$(BIN)/pip check --disable-pip-version-check
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, '(CUDA ' + torch.version.cuda + ' build)' if torch.version.cuda else '(CPU build)')"
	$(BIN)/python -m ipykernel install --sys-prefix --name tokexp --display-name "Python (tokexp)" >/dev/null
	@touch $(STAMP)

# Refresh the lock (needs the package registries): exact versions with hashes for Linux x86_64 / CPython 3.11, torch
# left out (installed first, CPU or CUDA build) but its dependencies pinned as the CPU wheel declares them.
LOCK_TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-2.13.0*),--find-links /opt/wheels,--index https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
lock:  # needs only uv, not an installable environment (the point may be to repair the lock)
	@test -x $(BIN)/uv || { test -x $(BIN)/python || $(PY) -m venv $(VENV); $(BIN)/pip install -q --disable-pip-version-check "uv>=0.13,<0.14"; }
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra ray --generate-hashes --no-emit-package torch --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 $(LOCK_TORCH_SOURCE) --custom-compile-command "make lock" -q -o $(LOCK).new
	@! grep -qE '^(nvidia|cuda)-' $(LOCK).new || { echo "the lock resolved a CUDA torch's dependencies: give LOCK_TORCH_SOURCE a CPU wheel source"; rm -f $(LOCK).new; exit 1; }
	@mv $(LOCK).new $(LOCK) && echo "wrote $(LOCK): $$(grep -cE '^[a-z]' $(LOCK)) packages, sha256 $$(sha256sum $(LOCK) | cut -c1-16)"
	@# the GPU-box path: PyPI's CUDA torch 2.13.0 (and its nvidia-*/triton pins) must resolve together with the lock
	@echo "torch==2.13.0" > $(LOCK).cuda.in && $(BIN)/uv pip compile $(LOCK).cuda.in pyproject.toml --extra dev --extra ray -c $(LOCK) \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 -q -o /dev/null \
	  && echo "CUDA torch 2.13.0 resolves with the lock" ; rc=$$?; rm -f $(LOCK).cuda.in; exit $$rc

# headless Chromium for the site test (Debian package); installed only when missing and we can (root)
sysdeps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "warning: chromium not installed (apt-get install chromium) - the site test will fail"; }

assets: env
	$(BIN)/tokexp assets fetch

lms: env assets
	$(BIN)/tokexp lm train

# the sweep `make run` publishes on the site: a 2x2 grid (model x few-shot examples) of char_tasks on a local Ray
SWEEP ?= char_tasks -p models "[[ref-small], [ref-llama]]" -p n_shots "[0, 1]" --metric mean_accuracy --max-parallel 2

run: env assets
	@rc=0; [ "$(PROFILE)" != cpu ] || $(BIN)/tokexp lm train || rc=$$?; \
	$(BIN)/tokexp run --profile $(PROFILE) || rc=$$?; \
	[ "$(PROFILE)" != cpu ] || [ -z '$(SWEEP)' ] || $(BIN)/tokexp sweep $(SWEEP) || rc=$$?; \
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

lab: env  # as root (containers) Jupyter refuses to start without --allow-root
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root)

clean-site:
	rm -rf _site _build _proc
