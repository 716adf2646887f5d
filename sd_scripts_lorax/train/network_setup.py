"""Create a kohya-contract network (networks.lora_x, lycoris.kohya, ...) on the loaded models, the way
kohya's train_network.py calls it, and collect its optimizer parameter groups."""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import torch

from ..errors import LoraxInputError
from .config import parse_key_values
from .models import TrainModels


def network_kwargs(network_args: Sequence[str] | None, dropout: float | None) -> dict[str, str | float | None]:
    """k=v strings (split on the first '='), plus kohya's injected `dropout` when absent."""
    kw: dict[str, Any] = parse_key_values(network_args, "network_args")
    kw.setdefault("dropout", dropout)
    return kw


def import_network_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise LoraxInputError(f"network_module {name!r} cannot be imported ({exc})") from None


def create_network(module: Any, models: TrainModels, dim: int | None, alpha: float | None,
                   dropout: float | None, kwargs: dict[str, Any], weights: str | None,
                   train_unet: bool, train_text_encoder: bool) -> torch.nn.Module:
    """create_network -> apply_to -> load_weights (kohya's order)."""
    te = models.network_text_encoder
    network = module.create_network(1.0, dim, alpha, models.vae, te, models.unet, neuron_dropout=dropout, **kwargs)
    if network is None:
        raise LoraxInputError(f"{module.__name__}.create_network returned None (nothing to train)")
    if hasattr(network, "prepare_network"):
        network.prepare_network(None)
    network.apply_to(te, models.unet, train_text_encoder, train_unet)
    if weights:
        info = network.load_weights(weights)
        print(f"loaded network weights from {weights}: {info}")
    return network


def optimizer_groups(network: torch.nn.Module, text_encoder_lr: float | None, unet_lr: float | None,
                     learning_rate: float) -> tuple[list[dict], list[str]]:
    """prepare_optimizer_params, accepting kohya's old (list) and new ((list, descriptions)) returns."""
    try:
        result = network.prepare_optimizer_params(text_encoder_lr, unet_lr, learning_rate)
    except TypeError:
        result = network.prepare_optimizer_params(text_encoder_lr, unet_lr)
    if isinstance(result, tuple):
        groups, descs = result
    else:
        groups, descs = result, []
    groups = [g for g in groups if g.get("lr", learning_rate)]  # lr 0 disables a part, as in kohya
    for g in groups:
        g["params"] = list(g["params"])
        g.setdefault("lr", learning_rate)
    if not groups or not any(p.requires_grad for g in groups for p in g["params"]):
        raise LoraxInputError("the network has no trainable parameters (check network_train_*_only and the lrs)")
    descs = list(descs) + [f"group{i}" for i in range(len(descs), len(groups))]
    return groups, descs[: len(groups)]


def call_hook(network: torch.nn.Module, name: str, *args: Any) -> None:
    """Optional per-step/epoch hooks, called with kohya's positional arguments."""
    fn = getattr(network, name, None)
    if fn is not None:
        fn(*args)

