"""kohya-ss sd-scripts, run for real: its pinned venv, a workspace (a copy of sd-scripts with this
project installed the way the README tells kohya users, full-size random-weight checkpoints, offline
tokenizers, a small dataset) and the probes run inside kohya's venv. Used by tests/kohya and
benchmarks/bench_kohya.py; nothing here is imported by the library."""
