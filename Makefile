# The two commands of the README. Each makes .venv and installs on first use.
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
# What `make lint` checks: the files that pass so far (the rest of the tree follows).
LINTED := model/ bench/pretrain.py stream/demo.py stream/pretrain.py stream/event_contract.py stream/synthetic.py stream/event_files.py \
	stream/online_writer.py stream/feast_sink.py tests/test_online_writer.py

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
