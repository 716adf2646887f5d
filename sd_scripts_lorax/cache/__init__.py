"""Everything kept under `--svd_cache_dir`: bases by weight content (`svd_cache`), the per-checkpoint
tensor index, remembered phi values and adapter norms (`phi_cache`), and the models' hashes. Every
JSON file here is a `book.JsonBook`. Anything missing or corrupt is recomputed, never an error."""
