PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test install train-demo clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned: the CPU build lies on local disk.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[edge,train,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/linejudge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

train-demo: $(STAMP)
	$(BIN)/linejudge train --config training/configs/demo.yaml --out runs/demo

clean:
	rm -rf $(VENV) runs
