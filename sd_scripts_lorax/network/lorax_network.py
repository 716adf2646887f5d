"""The LoRA-X network: kohya's network-module contract over `modules.LoraXModule`.

`create_network` / `create_network_from_weights` / `LoraXNetwork` are what kohya's
`train_network.py` (and our own trainer) call, in the order given in docs/kohya-contract.md §1.2.
The network finds its targets by class name exactly like kohya's `networks/lora.py`, names them the
kohya way (SD1/2 diffusers paths, SDXL SAI paths, `text_model.` TE paths), computes each target's
top-r bases once (batched by shape, cached by content hash when asked), and saves plain kohya LoRA
files (`lora_down` = V^T, `lora_up` = U diag(d), `alpha` = r).

The network's own state_dict is `<lora_name>.d` per applied module; the kohya triple exists only in
files (`save_weights`, `load_weights`, `merge_to`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .. import NETWORK_MODULE
from ..errors import LoraxInputError
from ..lorax import d_from_factors, delta_from_factors, delta_norm, energy_in_subspace, factors_fit
from .bases import check_finite, claimed_bases, compute_bases, disabled_autocast  # noqa: F401 (re-exported)
from .layer import LoraXModule
from .targets import (TE_TARGETS, UNET_CONV_TARGETS, UNET_TARGETS, Target, find_targets,  # noqa: F401 (re-exported)
                      text_encoder_parts, unet_naming)
from .options import DEFAULT_RANK, KNOWN_ARGS, NetworkOptions, parse_options  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- network


class LoraXNetwork(nn.Module):
    """LoRA-X adapters on a UNet and its text encoder(s), with kohya's network-module methods."""

    def __init__(self, targets: list[Target], options: NetworkOptions, multiplier: float = 1.0,
                 lazy: bool = False) -> None:
        super().__init__()
        self.options = options
        self.multiplier = float(multiplier)
        self._targets = {t.lora_name: t for t in targets}
        self._aliases = {t.alias: t.lora_name for t in targets if t.alias}
        self._not_applied: set[str] = set()
        self.text_encoder_loras: list[LoraXModule] = []
        self.unet_loras: list[LoraXModule] = []
        self._built = False
        self._enabled = True
        # V^T per module from a LoRA-X weights file, tried before any SVD (see resolve_bases)
        self._claims: dict[str, torch.Tensor] = {}
        # `lazy` is kept for callers; the bases are always computed on first use now (resolve_bases)
        check_finite(targets)  # refuse bad weights now, not when something first needs the bases
        self._build()

    # -- construction

    def _build(self) -> None:
        """The modules, with their bases deferred: the SVDs run on first use (`resolve_bases`)."""
        if self._built:
            return
        for t in self._targets.values():
            w = t.base.weight
            rank = min(t.rank, w.shape[0], w[0].numel())
            mod = LoraXModule(t.lora_name, t.base, None, self.multiplier, self.options.dropout, rank=rank,
                              resolve=self.resolve_bases)
            (self.unet_loras if t.part == "unet" else self.text_encoder_loras).append(mod)
        self._built = True
        logger.info("networks.lora_x: %d text-encoder and %d UNet modules, %d trainable numbers",
                    len(self.text_encoder_loras), len(self.unet_loras),
                    sum(m.rank for m in self.text_encoder_loras + self.unet_loras))

    def resolve_bases(self, claims: Mapping[str, torch.Tensor] | None = None) -> None:
        """Fill the bases of every module still waiting for them (modules apply_to left out never are).

        kohya calls create_network before it loads --network_weights, so nothing is computed until
        something needs the bases: load_weights (a LoRA-X file saved in float32 from this base holds
        them already: its V^T is checked and taken, no SVD), prepare_grad_etc, or a first forward.
        `claims`: V^T per module name (r, in) / (r, in, kh, kw), tried before computing.
        """
        pending = [m for m in self.all_loras() if m.bases_pending]
        if not pending:
            self._claims = {}
            return
        claims = {**self._claims, **(claims or {})}
        t0 = time.perf_counter()
        with torch.no_grad(), disabled_autocast():
            got = claimed_bases([self._targets[m.lora_name] for m in pending], claims) if claims else {}
            rest = [self._targets[m.lora_name] for m in pending if m.lora_name not in got]
            computed = compute_bases(rest, self.options.svd_method, self.options.svd_device,
                                     self.options.svd_cache_dir) if rest else {}
            for m in pending:
                m.set_bases(got.get(m.lora_name) or computed[m.lora_name])
        self._claims = {}
        logger.info("networks.lora_x: bases of %d modules in %.1f s (%d from the weights file, %d computed%s)",
                    len(pending), time.perf_counter() - t0, len(got), len(rest),
                    ", cached in " + self.options.svd_cache_dir if self.options.svd_cache_dir and rest else "")

    def all_loras(self) -> list[LoraXModule]:
        """Every module built, applied or not."""
        self._build()
        return self.text_encoder_loras + self.unet_loras

    def _by_name(self) -> dict[str, LoraXModule]:
        return {m.lora_name: m for m in self.all_loras()}

    # -- kohya contract: setup

    def prepare_network(self, args: Any) -> None:
        """kohya hook; nothing to prepare."""

    def apply_to(self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Patch the targeted layers and register the modules (names give state_dict keys `<lora_name>.d`)."""
        self._build()
        chosen = (self.text_encoder_loras if apply_text_encoder else []) + (self.unet_loras if apply_unet else [])
        if not apply_text_encoder:
            self._not_applied |= {m.lora_name for m in self.text_encoder_loras}
            self.text_encoder_loras = []
        if not apply_unet:
            self._not_applied |= {m.lora_name for m in self.unet_loras}
            self.unet_loras = []
        for mod in chosen:
            mod.apply_to()
            mod.enabled = self._enabled
            if mod.lora_name not in self._modules:
                self.add_module(mod.lora_name, mod)

    def applied_loras(self) -> list[LoraXModule]:
        """The modules registered by `apply_to` (what training and saving see)."""
        return [m for m in self.children() if isinstance(m, LoraXModule)]

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.resolve_bases()  # before the loop, not inside the first step's autocast and checkpointing
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def on_step_start(self, *args: Any, **kwargs: Any) -> None:
        """kohya hook; nothing per step."""

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the adapters run inside the base blocks, which checkpoint themselves."""

    def get_trainable_params(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def prepare_optimizer_params(self, text_encoder_lr: Any = None, unet_lr: Any = None,
                                 default_lr: Any = None) -> list[dict[str, Any]]:
        """A plain list of param groups; a group whose learning rate is 0/None after defaults is left out."""
        if isinstance(text_encoder_lr, (list, tuple)):
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        applied = {m.lora_name for m in self.applied_loras()}
        groups = []
        for loras, lr in ((self.text_encoder_loras, text_encoder_lr), (self.unet_loras, unet_lr)):
            lr = default_lr if lr is None else lr
            params = [m.d for m in loras if m.lora_name in applied]
            if params and lr:
                groups.append({"params": params, "lr": float(lr)})
        return groups

    # -- switches

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for m in self.text_encoder_loras + self.unet_loras:  # built ones only: no SVD for this
            m.multiplier = self.multiplier

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = bool(enabled)
        for m in self.text_encoder_loras + self.unet_loras:
            m.enabled = self._enabled

    def is_mergeable(self) -> bool:
        return True

    # -- norms

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device: Any = None) -> tuple[int, float, float]:
        """Clamp ||dW||_F = ||d|| (U, V orthonormal) to max_norm; returns (keys scaled, mean norm, max norm)."""
        norms, scaled = [], 0
        for m in self.applied_loras():
            norm = m.d.norm()
            if norm > max_norm:
                m.d.mul_(max_norm / norm)
                scaled += 1
            norms.append(float(m.d.norm()))
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # -- files

    def lora_modules(self) -> list:
        """The kohya triples of the applied modules (all built ones when nothing was applied)."""
        from ..formats.lora_file import LoraModule
        mods = self.applied_loras() or self.all_loras()
        return [LoraModule(m.lora_name, m.down_weight(), m.up_weight(), float(m.rank)) for m in mods]

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> None:
        """Write a kohya LoRA file: lora_down = V^T, lora_up = U diag(d), alpha = r, + metadata."""
        from ..formats.lora_file import lorax_metadata, write_lora
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.setdefault("ss_network_module", NETWORK_MODULE)
        # The source model as kohya's trainer records it (name and full-file hash, else the legacy one).
        source_hash = meta.get("ss_new_sd_model_hash") or meta.get("ss_sd_model_hash") or "unknown"
        meta.update(lorax_metadata(self.options.rank, meta.get("ss_sd_model_name", "unknown"), source_hash))
        write_lora(file, self.lora_modules(), meta, dtype=dtype, overwrite=True)

    def _canonical(self, modules: Mapping[str, Any]) -> dict[str, Any]:
        """A file's modules keyed by this network's names (SDXL diffusers-style names mapped to SAI)."""
        return {self._aliases.get(name, name): lm for name, lm in modules.items()}

    def _projections(self, file_name: str, modules: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """d per module from a file's factors; raises before anything is changed."""
        mine = self._by_name()
        unknown = [n for n in modules if n not in mine]
        if unknown:
            raise LoraxInputError(
                f"{file_name}: {len(unknown)} module(s) do not fit this model (rank {self.options.rank}, "
                f"conv_dim {self.options.conv_rank}): {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
        out = {}
        for name, lm in modules.items():
            m = mine[name]
            wshape = tuple(m.base.weight.shape)
            down, up = lm.down, lm.up
            if not factors_fit(up.shape, down.shape, wshape):
                raise LoraxInputError(f"{file_name}: module {name}: lora_up {tuple(up.shape)} / lora_down "
                                      f"{tuple(down.shape)} do not fit the base weight {wshape}")
            d = d_from_factors(m.u.float(), m.down.float().reshape(m.rank, -1).t(), up.float(), down.float(),
                               scale=lm.scale)
            if not torch.isfinite(d).all():
                raise LoraxInputError(f"{file_name}: module {name} holds NaN/Inf factors")
            out[name] = d
        return out

    def load_weights(self, file: str | os.PathLike) -> dict[str, Any]:
        """Set d from a LoRA(-X) file: d = diag(U^T up down V) * alpha/r (exact for LoRA-X files).

        A plain LoRA file is projected onto the base subspace; the share of its energy kept is logged.
        """
        from ..formats.lora_file import is_lorax, read_lora
        lf = read_lora(file)
        modules = self._canonical(lf.modules)
        # modules of a part that apply_to left out (e.g. --network_train_unet_only) are skipped, as kohya does
        skipped = sorted(n for n in modules if n in self._not_applied)
        modules = {n: lm for n, lm in modules.items() if n not in self._not_applied}
        lorax = is_lorax(lf)
        self.resolve_bases({n: lm.down for n, lm in modules.items()} if lorax else None)
        ds = self._projections(str(file), modules)
        mine = self._by_name()
        info: dict[str, Any] = {"loaded": len(ds), "skipped": skipped, "missing": sorted(set(mine) - set(ds)),
                                "lorax": lorax}
        info.update(self._energy_report(str(file), modules, ds, info["lorax"]))
        with torch.no_grad():
            for name, d in ds.items():
                mine[name].d.copy_(d.to(mine[name].d.device))
        return info

    def _energy_report(self, file_name: str, modules: Mapping[str, Any], ds: Mapping[str, torch.Tensor],
                       lorax: bool) -> dict[str, float]:
        """Share of the file's update (Frobenius, over all modules) inside the bases, and kept as d."""
        mine = self._by_name()
        sub_num = sub_den = diag_num = 0.0
        for name, lm in modules.items():
            m = mine[name]
            v = m.down.float().reshape(m.rank, -1).t()
            e = energy_in_subspace(lm.up.float(), lm.down.float(), m.u.float(), v)
            total2 = delta_norm(lm.up, lm.down, lm.scale) ** 2  # from the factors, without the out x in product
            sub_num += e * e * total2
            sub_den += total2
            diag_num += float(ds[name].double().square().sum())
        subspace = math.sqrt(sub_num / sub_den) if sub_den > 0 else 1.0
        diagonal = math.sqrt(diag_num / sub_den) if sub_den > 0 else 1.0
        if not lorax:
            logger.warning("%s is not a LoRA-X file: its update was projected onto the base subspace; "
                           "%.1f%% of its energy lies in that subspace and %.1f%% is kept as LoRA-X d",
                           file_name, 100 * subspace, 100 * diagonal)
        elif diagonal < 0.999:
            logger.warning("%s: only %.1f%% of this LoRA-X file's update fits this model's bases; was it made for "
                           "another base model? (transfer_lorax.py carries it over)", file_name, 100 * diagonal)
        return {"energy_in_subspace": subspace, "energy_kept": diagonal}

    @torch.no_grad()
    def merge_to(self, text_encoder: Any = None, unet: Any = None, weights_sd: Mapping[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        """Fold updates into the base weights.

        With `weights_sd` (kohya's `--base_weights`): the file's full update multiplier * up @ down *
        alpha/r is merged exactly, LoRA-X or plain LoRA alike. Without: this network's own d.
        """
        if weights_sd is None:
            for m in self.all_loras():
                m.merge_to()
            return
        modules = self._canonical(modules_from_state_dict(weights_sd, "merge_to"))
        unknown = [n for n in modules if n not in self._targets]
        if unknown:
            raise LoraxInputError(f"merge_to: {len(unknown)} module(s) do not fit this model: "
                                  f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
        deltas = {}
        for name, lm in modules.items():
            w = self._targets[name].base.weight
            if not factors_fit(lm.up.shape, lm.down.shape, w.shape):
                raise LoraxInputError(f"merge_to: module {name}: lora_up {tuple(lm.up.shape)} / lora_down "
                                      f"{tuple(lm.down.shape)} do not fit the base weight {tuple(w.shape)}")
            deltas[name] = delta_from_factors(lm.up.to(w.device), lm.down.to(w.device), lm.scale * self.multiplier)
        for name, dw in deltas.items():
            w = self._targets[name].base.weight
            w.copy_((w.float() + dw.reshape(w.shape)).to(w.dtype))
        logger.info("networks.lora_x: merged %d modules into the base weights", len(deltas))


# ---------------------------------------------------------------------------- kohya state dicts


def state_dict_of(modules: Iterable[Any]) -> dict[str, torch.Tensor]:
    """LoraModules as kohya's flat state dict (what create_network_from_weights hands back)."""
    from ..formats.lora_file import ALPHA, DOWN, UP
    sd: dict[str, torch.Tensor] = {}
    for lm in modules:
        sd[f"{lm.name}.{DOWN}"] = lm.down
        sd[f"{lm.name}.{UP}"] = lm.up
        sd[f"{lm.name}.{ALPHA}"] = torch.tensor(float(lm.alpha))
    return sd


def modules_from_state_dict(weights_sd: Mapping[str, torch.Tensor], origin: str) -> dict[str, Any]:
    """Group a kohya state dict (`weights_sd` as kohya passes it) into LoraModules, validated by lora_file."""
    from ..formats import lora_file
    return lora_file.modules_from_tensors(weights_sd, origin)


# ---------------------------------------------------------------------------- kohya entry points


def create_network(multiplier: float, network_dim: Any, network_alpha: Any, vae: Any, text_encoder: Any,
                   unet: nn.Module, neuron_dropout: Any = None, **kwargs: Any) -> LoraXNetwork:
    """kohya's `create_network`: a LoRA-X network of rank `network_dim` (default 320), d = 0."""
    options = parse_options(network_dim, network_alpha, neuron_dropout, kwargs)
    if options.alpha is not None:
        logger.info("networks.lora_x: network_alpha=%g is recorded but not applied (LoRA-X saves alpha = rank)",
                    options.alpha)
    targets = find_targets(text_encoder, unet, options.rank, options.conv_rank)
    return LoraXNetwork(targets, options, multiplier)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any
                                ) -> tuple[LoraXNetwork, dict[str, torch.Tensor]]:
    """kohya's `create_network_from_weights`: modules and ranks from a LoRA(-X) file.

    `for_inference=True` (kohya's --base_weights) skips the SVDs until something needs them:
    `merge_to` with the file's weights does not.
    """
    from ..formats.lora_file import is_lorax, read_lora
    lf = None
    if weights_sd is None:
        if file is None:
            raise LoraxInputError("create_network_from_weights: neither a file nor weights_sd was given")
        lf = read_lora(file)
        modules = lf.modules
        weights_sd = state_dict_of(modules.values())
    else:
        modules = modules_from_state_dict(weights_sd, str(file or "weights_sd"))
    ranks = {name: lm.rank for name, lm in modules.items()}
    options = parse_options(max(ranks.values(), default=DEFAULT_RANK), None, None, kwargs)
    targets = find_targets(text_encoder, unet, options.rank, options.conv_rank, ranks=ranks)
    found = {t.lora_name for t in targets} | {t.alias for t in targets if t.alias}
    unknown = [n for n in ranks if n not in found]
    if unknown:
        raise LoraxInputError(f"{file or 'weights_sd'}: {len(unknown)} module(s) do not fit this model: "
                              f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    network = LoraXNetwork(targets, options, multiplier, lazy=for_inference)
    if lf is not None and is_lorax(lf):
        # the file holds this base's bases: the first use takes them instead of an SVD (checked)
        network._claims = {name: lm.down for name, lm in network._canonical(modules).items()}
    return network, dict(weights_sd)
