# The two entry points of the README. Each creates or updates .venv by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Torch goes in before the project so that pip never resolves a CUDA build of
# several GB on a CPU machine. Override on a GPU machine: make TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.forge-installed

.PHONY: quickstart test venv clean

venv: $(STAMP)

# Re-run the install whenever the dependency list changes; pip skips what is there.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/forge train recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs wandb
