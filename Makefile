# Two commands for a fresh machine: `make test` and `make demo`.
# `pip install -e .` alone is the core (what networks.lora_x needs, for kohya's venv); `.[test]` is everything.
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
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(VPY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

# tests/kohya runs kohya's real trainers in kohya's own venv (built once per machine under
# ~/.cache/sd-scripts-lorax/); --dist loadscope keeps each test module on one worker, in order
# (the kohya stages build on each other).
test: setup
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q -n 2 --dist loadscope tests

demo: setup
	$(VPY) -m sd_scripts_lorax.tools.demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
