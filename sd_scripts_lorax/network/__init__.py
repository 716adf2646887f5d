"""The kohya network module: the LoRA-X layer wrapper, targeting of kohya's modules, and
`LoraXNetwork` with kohya's contract (`networks/lora_x.py` re-exports this package)."""

from .lorax_network import LoraXNetwork, create_network, create_network_from_weights

__all__ = ["LoraXNetwork", "create_network", "create_network_from_weights"]
