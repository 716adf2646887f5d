"""The adapter the distillation trains: LoRA-X modules of the target, hooked onto live layers.

Each module adds ``scale * up @ down`` to its layer's output through a forward hook (a Linear, or
a Conv2d whose `down` is a k x k convolution and `up` a 1x1). For a trained module the projection's
output ``up = U_t C, down = V_t^T`` becomes

    up(delta) = U_t (C + diag(delta))          (params "d": r numbers per module, the default)
    up(core)  = U_t core,  core initialised to C   (params "core": the r x r core, r^2 numbers)

so the update stays in the target's own top-r subspace (the file is still a LoRA-X of the target)
and delta = 0 / core = C is exactly Eq. 3. U_t comes from the target weight and the module's V_t:
``W V_t = U_t S`` for exact singular vectors, so U_t = normalised columns of W V_t, with the signs
the projection used. The same class applies any other kohya factors unchanged (`trainable=False`):
the source adapter copied as is, for the copy baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import LoraxInputError
from .options import PARAM_MODES



@dataclass
class _Slot:
    name: str
    layer: nn.Module
    down: torch.Tensor          # (r, in) or (r, in, kh, kw)
    up: torch.Tensor            # (out, r): the fixed part
    scale: float
    u: torch.Tensor | None      # (out, r): U_t of a trained module
    param: nn.Parameter | None  # delta (r,) or core (r, r)
    mode: str

    def up_now(self) -> torch.Tensor:
        if self.param is None:
            return self.up
        if self.mode == "d":
            return self.up + self.u * self.param
        return self.u @ self.param


def target_u(weight: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """U_t from the target weight and V_t^T (= down): normalised columns of W V_t (float32)."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    wv = w @ down.detach().float().reshape(down.shape[0], -1).T
    norms = wv.norm(dim=0, keepdim=True)
    if bool((norms <= 1e-12 * max(float(norms.max()), 1e-30)).any()):
        raise LoraxInputError("distill: a module's target weight has a zero singular value in its top-r subspace")
    return wv / norms


class Adapter:
    """Hooks that add kohya LoRA factors to live layers; some modules trainable (see module doc)."""

    def __init__(self, layers: Mapping[str, nn.Module], modules: Iterable, trainable: Iterable[str] = (),
                 mode: str = "d") -> None:
        if mode not in PARAM_MODES:
            raise LoraxInputError(f"--distill_params must be one of {', '.join(PARAM_MODES)}, got {mode!r}")
        train = set(trainable)
        self.slots: list[_Slot] = []
        self.enabled = True
        self._handles = []
        for lm in modules:
            layer = layers.get(lm.name)
            if layer is None:
                raise LoraxInputError(f"distill: module {lm.name} of the adapter has no layer in the model")
            w = layer.weight
            down = lm.down.detach().float().to(w.device)
            up = lm.up.detach().float().reshape(lm.up.shape[0], -1).to(w.device)
            if down.dim() == 2 and w.dim() == 4:
                down = down.reshape(down.shape[0], *w.shape[1:])  # a 1x1 conv stored as a matrix
            if up.shape[0] != w.shape[0] or down[0].numel() != w[0].numel():
                raise LoraxInputError(f"distill: module {lm.name}: up {tuple(lm.up.shape)} / down "
                                      f"{tuple(lm.down.shape)} do not fit the layer weight {tuple(w.shape)}")
            u = param = None
            if lm.name in train:
                u = target_u(w, down)
                init = torch.zeros(down.shape[0]) if mode == "d" else (u.T @ up)
                param = nn.Parameter(init.to(w.device))
            slot = _Slot(lm.name, layer, down, up, float(lm.scale), u, param, mode)
            self.slots.append(slot)
            self._handles.append(layer.register_forward_hook(self._hook(slot)))

    def _hook(self, slot: _Slot):
        def hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return out
            x = args[0]
            up = slot.up_now().to(x.dtype)
            down = slot.down.to(x.dtype)
            if isinstance(layer, nn.Conv2d):
                h = F.conv2d(x, down if down.dim() == 4 else down[:, :, None, None], None, layer.stride,
                             layer.padding, layer.dilation)
                extra = F.conv2d(h, up[:, :, None, None])
            else:
                extra = F.linear(F.linear(x, down), up)
            return out + slot.scale * extra.to(out.dtype)
        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [s.param for s in self.slots if s.param is not None]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def modules(self, like: Mapping) -> list:
        """LoraModules with the current up (same names, downs and alphas as `like`'s modules)."""
        from ...formats.lora_file import LoraModule

        out = []
        for s in self.slots:
            lm = like[s.name]
            up = s.up_now().detach().cpu().reshape(lm.up.shape).to(torch.float32)
            out.append(LoraModule(name=lm.name, down=lm.down.detach().cpu().float(), up=up.contiguous(),
                                  alpha=float(lm.alpha)))
        return out
