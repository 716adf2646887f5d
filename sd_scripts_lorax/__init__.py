"""sd-scripts-lorax: LoRA-X (ICLR 2025) for kohya-ss sd-scripts.

One package per job (the full map, module by module: docs/architecture.md):
  lorax/      the math, no I/O: bases, factors, similarity, worker threads
  families/   every SD1/SD2/SDXL fact: registry, detection, names, key layouts, architectures
  formats/    bytes on disk, no math: safetensors, pickles, checkpoints, LoRA files, hashes, writes
  cache/      everything under --svd_cache_dir
  network/    the kohya network module (networks/lora_x.py re-exports it)
  transfer/   the transfer: engine, matching and transfer methods (project, distill), outputs, report
  train/      the trainer behind train_network_lorax.py
  tools/      inspect, the demo and its metrics
  testing/    fixtures, the offline tokenizer, the embedded demo pair, kohya's real trainers
"""

__version__ = "0.1.0"
FORMAT_VERSION = "1"
# the kohya --network_module that trains LoRA-X, and so the ss_network_module of the files it saves
NETWORK_MODULE = "networks.lora_x"
