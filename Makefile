# make demo: train a small model on Shakespeare and print a sample (about ten minutes on 2 CPU cores)
# make test: the test suite (fast tests; `make test-all` adds the slow ones)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-llamacpp clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/samovar demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# llama.cpp from the sources vendored in the llama-cpp-python sdist on PyPI, built once into .cache
# (minutes on 2 cores): llama-server, llama-cli, llama-perplexity and llama-quantize, for the GGUF tests against the real program
LLAMACPP_VERSION := 0.3.36
LLAMACPP := .cache/llama.cpp-$(LLAMACPP_VERSION)
LLAMACPP_BIN := $(LLAMACPP)/build/bin

$(LLAMACPP_BIN)/llama-cli: | $(STAMP)
	mkdir -p $(LLAMACPP)
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) -d $(LLAMACPP)
	tar -xzf $(LLAMACPP)/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C $(LLAMACPP) --strip-components=2 \
		llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp
	cmake -S $(LLAMACPP)/llama.cpp -B $(LLAMACPP)/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF > $(LLAMACPP)/cmake.log
	cmake --build $(LLAMACPP)/build --target llama-server llama-cli llama-perplexity llama-quantize -j $$(nproc) > $(LLAMACPP)/build.log

test-llamacpp: $(LLAMACPP_BIN)/llama-cli
	SAMOVAR_LLAMACPP_BIN=$(abspath $(LLAMACPP_BIN)) $(PY) -m pytest -q -m llamacpp tests/test_gguf.py

clean:
	rm -rf $(VENV) runs .pytest_cache
