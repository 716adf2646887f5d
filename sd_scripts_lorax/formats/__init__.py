"""Bytes on disk, no math: the safetensors layer, checkpoints (lazy reading), kohya LoRA(-X) files
and their metadata, model hashes, the NaN/Inf check and atomic writes."""
