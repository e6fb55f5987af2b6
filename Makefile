# Everything installs from nothing into .venv. torch is pinned to the CPU wheel these
# machines carry; on a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0"
# with --index-url of your CUDA build) or install torch into the venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
export RAY_AUTH_MODE ?= disabled
# Ray starts its workers at nice 15 (so a driver stays responsive); here the workers ARE
# the server (router, draft, target), so they run at the normal priority.
export RAY_worker_niceness ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast demo serve bench train-pair proto clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e ".[test,bench]"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q -x --timeout=900 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# Foreground; answers on 127.0.0.1:8000 (HTTP) and :9000 (gRPC). Stop with Ctrl-C / SIGTERM.
serve: install
	$(BIN)/serve run deployments/default.yaml

demo: install
	$(BIN)/python -m specserve_ray.demo

bench: install
	$(BIN)/python -m specserve_ray.bench single --json bench_single.json

train-pair: install
	$(BIN)/python scripts/train_pair.py --preset cpu --out specserve_ray/assets/tiny-pair

# The gRPC stubs are committed; regenerate them after editing the .proto.
proto: install
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. deployments/proto/specserve.proto

clean:
	rm -rf $(VENV) .pytest_cache
