"""Everything kept under `--svd_cache_dir`: bases by weight content, the per-checkpoint tensor
index, remembered phi values and adapter norms, and the models' hashes. Anything missing or corrupt
is recomputed, never an error."""
