"""User-facing tools over the library: `inspect`, the demo (`make demo`) and its metrics."""
