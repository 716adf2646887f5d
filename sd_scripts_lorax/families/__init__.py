"""Every fact about the model families (SD1, SD2, SDXL): kohya names <-> module paths <-> checkpoint
keys, LDM/SAI <-> diffusers key conversion, and the architectures (tiny and full size)."""
