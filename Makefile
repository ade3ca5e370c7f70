# The two commands of the README. Each makes .venv and installs on first use.
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
# What `make lint` checks: the whole tree.
LINTED := stream/ tests/ bench/ model/ feature_repo/ examples/

.PHONY: demo test lint install clean

demo: $(VENV)/.installed
	$(VENV)/bin/beat demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# ruff (configuration in pyproject.toml): pyflakes, pycodestyle, import order, 100 columns.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(LINTED)

install: $(VENV)/.installed

# torch first, pinned: these machines hold a local CPU wheel of 2.13.0, and a bare
# torch requirement resolved later would download the multi-GB CUDA build instead.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) data feature_repo/data
