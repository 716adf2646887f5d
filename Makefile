# Two commands for a fresh machine: `make test` and `make demo`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The local CPU wheel of torch; a plain `pip install torch` would pull a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: setup
	$(VPY) -m pytest -q -n 2 tests

demo: setup
	$(VPY) -m sd_scripts_lorax.tools.demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
