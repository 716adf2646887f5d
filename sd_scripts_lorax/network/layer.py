"""LoRA-X wrappers for nn.Linear and nn.Conv2d.

A `LoraXModule` patches the `forward` of one base layer so that

    y = W x + m * U (d * (V^T x))

with U (out, r), V (in*kh*kw, r) frozen buffers (the base weight's own top singular vectors) and d
(r,) the only trainable numbers. The out x in update is never built in the forward: the input goes
through V^T ("down", r channels) then through U diag(d) ("up"). The base layer is held in a plain
Python attribute, never registered as a submodule, so a network's state_dict holds only `d`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..lorax.factors import delta_from_factors

WRAPPABLE = ("Linear", "Conv2d")


class BasesLike(Protocol):
    """Anything with `u` (out, r) and `v` (in*kh*kw, r): lorax.bases.Bases fits."""

    u: torch.Tensor
    v: torch.Tensor


def is_kxk(base: nn.Module) -> bool:
    """True for a Conv2d whose kernel is larger than 1x1 (its rank comes from conv_dim)."""
    return isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)


class LoraXModule(nn.Module):
    """One LoRA-X adapter on one base Linear or Conv2d (groups == 1).

    Buffers (not persistent): `down` = V^T shaped like a layer weight, (r, in) or (r, in, kh, kw);
    `u` = U, (out, r). Parameter: `d`, fp32 zeros (r,). `apply_to()` patches the base forward,
    `restore()` undoes it; `merge_to()` folds m * U diag(d) V^T into the base weight.

    Deferred bases: built with `bases=None` and a `rank`, the buffers are allocated (so `.to()`,
    accelerate and DDP see them) but not yet filled; the first use of `u` / `down` calls `resolve`
    (the network computes every pending module's bases in one batch, or takes them from a weights
    file), and `set_bases` fills them. kohya creates the network before it loads --network_weights,
    so the SVDs wait until it is known whether the file already holds the bases.
    """

    def __init__(self, lora_name: str, base: nn.Module, bases: BasesLike | None, multiplier: float = 1.0,
                 dropout: float | None = None, dtype: torch.dtype | None = None, rank: int | None = None,
                 resolve: Callable[[], None] | None = None) -> None:
        super().__init__()
        kind = type(base).__name__
        if kind not in WRAPPABLE:
            raise TypeError(f"{lora_name}: cannot wrap a {kind}; only Linear and Conv2d")
        if kind == "Conv2d" and base.groups != 1:
            raise ValueError(f"{lora_name}: grouped Conv2d (groups={base.groups}) is not supported")
        weight = base.weight
        self.lora_name = lora_name
        self.base_weight_shape = tuple(weight.shape)
        if bases is not None:
            u, v = bases.u, bases.v
            if (u.ndim != 2 or v.ndim != 2 or u.shape[0] != weight.shape[0] or v.shape[0] != weight[0].numel()
                    or u.shape[1] != v.shape[1]):
                raise ValueError(f"{lora_name}: bases u {tuple(u.shape)} / v {tuple(v.shape)} do not fit the base "
                                 f"weight {tuple(weight.shape)}")
            rank = u.shape[1]
        elif rank is None or resolve is None:
            raise ValueError(f"{lora_name}: deferred bases need a rank and a resolve callback")
        # The compute dtype is the base's (fp32 for training; fp16/bf16 for inference-only bases).
        if dtype is None:
            dtype = weight.dtype if weight.dtype.is_floating_point and weight.dtype.itemsize >= 2 else torch.float32
        device = weight.device if weight.device.type != "meta" or bases is None else bases.u.device
        self.register_buffer("down_buf", torch.empty(rank, *weight.shape[1:], device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("u_buf", torch.empty(weight.shape[0], rank, device=device, dtype=dtype), persistent=False)
        self._pending = True
        self._resolve: list[Callable[[], None] | None] = [resolve]  # a list: not an attribute nn.Module tracks
        if bases is not None:
            self.set_bases(bases)
        self.d = nn.Parameter(torch.zeros(rank, dtype=torch.float32, device=device))
        self.rank = rank
        self.multiplier = float(multiplier)
        self.dropout = float(dropout) if dropout else 0.0
        self.enabled = True
        self.is_conv = kind == "Conv2d"
        # A list, not an attribute: nn.Module would otherwise register the base as a submodule.
        self._base: list[nn.Module] = [base]
        self._org_forward: Callable[..., torch.Tensor] | None = None
        self._had_instance_forward = False

    # ------------------------------------------------------------------ bases

    @torch.no_grad()
    def set_bases(self, bases: BasesLike) -> None:
        """Fill U and V^T (cast to the buffers' device and dtype); shapes must fit the base weight."""
        weight = self.base_weight_shape
        u, v = bases.u, bases.v
        rank = self.u_buf.shape[1]
        if (u.ndim != 2 or v.ndim != 2 or u.shape != (weight[0], rank)
                or v.shape != (math.prod(weight[1:]), rank)):
            raise ValueError(f"{self.lora_name}: bases u {tuple(u.shape)} / v {tuple(v.shape)} do not fit the base "
                             f"weight {tuple(weight)} at rank {rank}")
        self.u_buf.copy_(u)
        self.down_buf.copy_(v.t().reshape(self.down_buf.shape))
        self._pending = False

    @property
    def bases_pending(self) -> bool:
        return self._pending

    def _ready(self) -> None:
        if self._pending:
            resolve = self._resolve[0]
            if resolve is not None:
                resolve()
            if self._pending:
                raise RuntimeError(f"{self.lora_name}: bases were never computed")

    @property
    def down(self) -> torch.Tensor:
        """V^T, (r, in) or (r, in, kh, kw) (computed on first use when deferred)."""
        self._ready()
        return self.down_buf

    @property
    def u(self) -> torch.Tensor:
        """U, (out, r) (computed on first use when deferred)."""
        self._ready()
        return self.u_buf

    # ------------------------------------------------------------------ patching

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def is_applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        """Patch the base layer's forward (idempotent)."""
        if self.is_applied:
            return
        base = self.base
        self._had_instance_forward = "forward" in base.__dict__
        self._org_forward = base.forward
        base.forward = self.forward

    def restore(self) -> None:
        """Undo `apply_to`: the base layer runs its own forward again."""
        if not self.is_applied:
            return
        base = self.base
        if self._had_instance_forward:
            base.forward = self._org_forward
        else:
            del base.forward  # back to the class method
        self._org_forward = None

    # ------------------------------------------------------------------ forward

    def _down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return F.linear(x, down)
        base = self.base
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            return F.conv2d(x, down, None, base.stride, 0, base.dilation)
        return F.conv2d(x, down, None, base.stride, base.padding, base.dilation)

    def _up(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return F.linear(h, u)
        return F.conv2d(h, u[:, :, None, None])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus m * U (d * (V^T x)); the base alone when disabled or m == 0."""
        y = self._org_forward(x, *args, **kwargs)
        if not self.enabled or self.multiplier == 0.0:
            return y
        down, u = self.down, self.u
        if not torch.is_autocast_enabled(x.device.type) and down.dtype != x.dtype:
            down, u = down.to(x.dtype), u.to(x.dtype)
        h = self._down(x, down)
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout)
        # d stays fp32 as a parameter; cast at use so mixed precision computes in h's dtype.
        d = self.d.to(h.dtype)
        if self.multiplier != 1.0:
            # scale the r numbers, not the (tokens x out) result: that was two extra full passes
            d = d * self.multiplier
        h = h * (d[:, None, None] if self.is_conv else d)
        return y + self._up(h, u).to(y.dtype)

    # ------------------------------------------------------------------ dense forms

    def up_weight(self) -> torch.Tensor:
        """The kohya `lora_up.weight`: U diag(d), (out, r) or (out, r, 1, 1) for convs; fp32."""
        up = self.u.float() * self.d.detach().float()[None, :]
        return up[:, :, None, None] if self.is_conv else up

    def down_weight(self) -> torch.Tensor:
        """The kohya `lora_down.weight`: V^T, (r, in) or (r, in, kh, kw); fp32."""
        return self.down.float()

    def delta_weight(self) -> torch.Tensor:
        """m * U diag(d) V^T shaped like the base weight, fp32 (for merging; not used in forward)."""
        return delta_from_factors(self.up_weight(), self.down_weight(), self.multiplier).reshape(self.base.weight.shape)

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None) -> None:
        """Fold the update into the base weight (in the base's dtype) and unpatch the forward."""
        weight = self.base.weight
        saved = self.multiplier
        if multiplier is not None:
            self.multiplier = float(multiplier)
        try:
            dw = self.delta_weight().to(weight.device)
        finally:
            self.multiplier = saved
        weight.copy_((weight.float() + dw).to(weight.dtype))
        self.restore()

    def extra_repr(self) -> str:
        return f"{self.lora_name}, rank={self.rank}, conv={self.is_conv}, multiplier={self.multiplier}"
