"""kohya network module for LoRA-X: `--network_module networks.lora_x`.

A thin re-export of sd_scripts_lorax.network, so the same file works inside a kohya-ss sd-scripts
checkout (copied into its `networks/` folder) and with this project's own trainer. Nothing from
kohya's `library` is imported.
"""

try:
    from sd_scripts_lorax.network import LoraXNetwork, create_network, create_network_from_weights
except ImportError as exc:  # used inside a kohya checkout without this project installed
    raise ImportError(
        "networks.lora_x needs the sd-scripts-lorax package: run `pip install sd-scripts-lorax` "
        "(or `pip install -e /path/to/sd-scripts-lorax`) in the environment that runs kohya's trainer "
        f"({exc})"
    ) from exc

__all__ = ["LoraXNetwork", "create_network", "create_network_from_weights"]
