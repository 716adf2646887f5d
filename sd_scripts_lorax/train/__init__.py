"""The trainer behind train_network_lorax.py: config (CLI + TOML), data (captions, buckets, latent
cache), models and conditioning, loss, optimizer, the accelerate loop, checkpoints, metadata, samples."""
