# Two commands set up and run everything on a fresh machine:
#   make demo   creates .venv, installs strata, embeds the sample corpus with the packaged model,
#               indexes its sentence vectors and searches them
#   make test   creates .venv (if needed), installs strata with test extras, runs the test suite
#
# TORCH picks the PyTorch build. The default pins the release whose CPU build this project's
# machines hold locally, so CPU-only set-up never downloads a multi-GB CUDA build. Elsewhere:
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"   (CPU machine)
#   make demo TORCH=torch                                                       (GPU machine)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

# pip byte-compiles what it installs: where PYTHONDONTWRITEBYTECODE is set (these machines), Python
# would otherwise compile torch, ray and transformers anew in every process and Ray worker
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/strata run configs/demo.yaml
	$(BIN)/strata index out/demo --column sentence --to out/demo-index
	$(BIN)/strata search out/demo-index "how do I read a file line by line" -k 3

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
