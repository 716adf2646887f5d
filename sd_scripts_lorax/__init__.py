"""sd-scripts-lorax: LoRA-X (ICLR 2025) for kohya-ss sd-scripts.

Library layout (see docs/architecture.md):
  lorax/        pure tensor math (bases, similarity, projection)
  modules.py    LoRA-X wrappers for Linear and Conv2d
  naming.py     kohya names <-> module paths <-> checkpoint keys
  checkpoint.py lazy checkpoint reading, family detection, hashes
  lora_file.py  kohya LoRA(-X) file reading and writing
  transfer.py   the training-free transfer pipeline and its report
  train/        the trainer's parts
"""

__version__ = "0.1.0"
FORMAT_VERSION = "1"
# the kohya --network_module that trains LoRA-X, and so the ss_network_module of the files it saves
NETWORK_MODULE = "networks.lora_x"
