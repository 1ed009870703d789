# Two commands on a fresh machine: `make run` (the appliance demo) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUNDLE := models/bundles/el-solar-default

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: run test browser postgres install train-demo train-full eval-full default-bundle bench xdist clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build lies on local disk; anything else pulls CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[edge,train,hq,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/linejudge demo

# Debian chromium for tests/appliance/test_browser.py (it skips where none is installed).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium not installed: the browser test will skip"

# Debian's PostgreSQL server for the HQ tests on PostgreSQL (they skip where none can start).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql) || echo "postgresql not installed: the HQ-on-PostgreSQL tests will skip"

test: $(STAMP) browser postgres
	$(BIN)/python -m pytest -q

train-demo: $(STAMP)
	$(BIN)/linejudge train --config training/configs/demo.yaml --out runs/demo

# The shipped model: train (about an hour on 2 CPU cores), evaluate on the test split, export.
train-full: $(STAMP)
	$(BIN)/linejudge train --config training/configs/full.yaml --out runs/full

eval-full: $(STAMP)
	$(BIN)/linejudge eval --model runs/full --split val --json runs/full/eval_val.json
	$(BIN)/linejudge eval --model runs/full --split test --json runs/full/eval_test.json
	mkdir -p reports/full && cp runs/full/eval_val* runs/full/eval_test* reports/full/ && cp runs/full/summary.json reports/full/

keys/hq.key:
	$(BIN)/linejudge bundle keygen --out keys --key-id hq
	mkdir -p models/keys && cp keys/hq.pub models/keys/hq.pub

# Block 0's depthwise conv stays fp32: with it INT8 the top-1 agreement gate fails (0.9806 < 0.99).
default-bundle: $(STAMP) keys/hq.key
	$(BIN)/linejudge export --checkpoint runs/full --out $(BUNDLE) --key keys/hq.key --key-id hq --keep-fp32 /blocks.0/_depthwise_conv/Conv
	$(BIN)/linejudge bundle verify $(BUNDLE)
	$(BIN)/linejudge eval --model $(BUNDLE) --split test --json reports/full/bundle_eval_test.json

bench: $(STAMP)
	$(BIN)/linejudge bench --run runs/full --bundle $(BUNDLE) --json reports/bench/bench.json
	$(BIN)/linejudge bench --pipeline --bundle $(BUNDLE) --json reports/bench/pipeline.json

# Cross-distribution: synthetic only -> ELPV test; mono only -> the poly columns of the ELPV test.
XDIST := synthetic mono
xdist: $(STAMP)
	for name in $(XDIST); do \
	  $(BIN)/linejudge train --config training/configs/xdist-$$name.yaml --out runs/xdist-$$name && \
	  $(BIN)/linejudge eval --model runs/xdist-$$name --split test --json runs/xdist-$$name/eval_test.json && \
	  mkdir -p reports/xdist/$$name && cp runs/xdist-$$name/eval_test* reports/xdist/$$name/ || exit 1; \
	done

clean:
	rm -rf $(VENV) runs state
