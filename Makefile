# kvbento — the two quick-start commands are `make serve` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000
STAMP := $(VENV)/.installed

.PHONY: setup browser serve test test-fast test-deploy bench-model bench model clean image image-test image-check loadtest

# (Re)create .venv when pyproject.toml changes. torch is pinned first so pip never resolves an
# unpinned torch (which would pull gigabytes of CUDA wheels).
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $(STAMP)

setup: $(STAMP) model

# The tiny default model, created deterministically (no model hub needed).
model: $(STAMP)
	@$(BIN)/python -m model.bundled >/dev/null

serve: setup
	$(BIN)/bentoml serve --port $(PORT)

test: setup browser
	$(BIN)/python -m pytest -q

# Headless Chromium and its driver from apt, for the playground's browser test (nothing is
# downloaded when it runs). Outside CI a failed install only makes that test skip.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; } \
	  || { [ "$$CI" != true ] && echo "chromium not installed: tests/e2e/test_playground.py will skip"; }; }

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit tests/integration

# Scale-out with real parts (tests/deploy): HAProxy hashing X-KV-Request-Id over three replicas on a
# local three-master Redis Cluster. Installs haproxy and redis-server from apt when missing.
test-deploy: setup
	@command -v haproxy >/dev/null && command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq haproxy redis-server; }
	KVBENTO_DEPLOY_TEST=1 $(BIN)/python -m pytest -q -m deploy tests/deploy

# The ~100M-parameter benchmark model; its directory is the last line printed.
bench-model: setup
	@$(BIN)/python -m model.bundled --bench

# Side-by-side benchmark (kvbento vs vLLM's CPU build (own venv under var/, made on first run; --no-vllm skips)
# vs `transformers serve --continuous-batching` vs naive generate);
# rewrites BENCHMARKS.md. `make bench BENCH_ARGS=--quick` is the seconds-long smoke run.
bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	@$(BIN)/python -m model.bundled --bench >/dev/null
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The OCI image kvbento:latest, built with buildah from the bento (no Docker engine, no registry):
# tools from apt, a cached debootstrap base image, the CPU torch wheel. See deploy/image/.
image: setup
	$(BIN)/pip install -q -e ".[image]"
	deploy/image/build.sh

# Runs the image with podman, waits for /readyz, generates (plain, streamed, continued), stops it.
image-test:
	deploy/image/smoke.sh

# Both of the above as the marked test tests/image (what .ci/run's image step runs).
image-check: setup
	KVBENTO_IMAGE_TEST=1 $(BIN)/python -m pytest -q -m image tests/image

# Load test: starts a server (or targets LOADTEST_HOST), runs locust headless, prints a summary;
# CSV + HTML reports under loadtests/reports/. Knobs: LOADTEST_USERS, LOADTEST_DURATION, ...
loadtest: setup
	$(BIN)/python loadtests/run.py

clean:
	rm -rf $(VENV) var .pytest_cache
