"""LoRA factors <-> LoRA-X quantities, without forming out x in products (docs/design.md §2).

Factor shapes everywhere: `down` (k, in) or (k, in, kh, kw), `up` (out, k) or (out, k, 1, 1), and
dW = scale * up @ down (flattened). Results are float32 (float64 for the norms), on the inputs' device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .bases import Bases


def flatten_weight(w: Tensor) -> Tensor:
    """A Linear (out, in) or Conv2d (out, in, kh, kw) weight as the (out, in*kh*kw) matrix."""
    if w.dim() == 2:
        return w
    if w.dim() == 4:
        return w.reshape(w.shape[0], -1)
    raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(w.shape)}")


def factors_fit(up: Sequence[int], down: Sequence[int], weight: Sequence[int]) -> bool:
    """Whether factors of these shapes form an update of a weight of this shape: `up` (out, r[, 1, 1]);
    `down` (r, in[, 1, 1]) for a Linear or 1x1 conv, (r, in, kh, kw) for a kh x kw conv. The one shape
    check of files, state dicts and checkpoints against each other."""
    up, down, weight = tuple(up), tuple(down), tuple(weight)
    if len(weight) not in (2, 4) or len(down) not in (2, 4) or len(up) not in (2, 4):
        return False
    if len(weight) == 2 or weight[2:] == (1, 1):
        down_ok = (len(down) == 2 or down[2:] == (1, 1)) and down[1] == weight[1]
    else:
        down_ok = len(down) == 4 and down[1:] == weight[1:]
    return down_ok and up[0] == weight[0] and up[1] == down[0] and (len(up) == 2 or up[2:] == (1, 1))


def _up2d(up: Tensor) -> Tensor:
    if up.dim() == 2:
        return up
    if up.dim() == 4 and up.shape[2:] == (1, 1):
        return up.reshape(up.shape[0], up.shape[1])
    raise ValueError(f"lora_up must be (out, r) or (out, r, 1, 1), got shape {tuple(up.shape)}")


def _factors2d(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor]:
    """(out, k) and (k, n) float32 matrices, rank checked."""
    up2 = _up2d(up)
    if down.dim() not in (2, 4):
        raise ValueError(f"lora_down must be (r, in) or (r, in, kh, kw), got shape {tuple(down.shape)}")
    down2 = down.reshape(down.shape[0], -1)
    if up2.shape[1] != down2.shape[0]:
        raise ValueError(f"rank mismatch: lora_up {tuple(up.shape)} vs lora_down {tuple(down.shape)}")
    dtype = torch.promote_types(torch.promote_types(up2.dtype, down2.dtype), torch.float32)
    return up2.to(dtype), down2.to(dtype)


def _weight_shape(up: Tensor, down: Tensor) -> tuple[int, ...]:
    out = up.shape[0]
    if down.dim() == 4:
        return (out, *down.shape[1:])
    if up.dim() == 4:  # 1x1 conv given with a 2-D down
        return (out, down.shape[1], 1, 1)
    return (out, down.shape[1])


def delta_from_factors(up: Tensor, down: Tensor, scale: float = 1.0) -> Tensor:
    """Dense dW = scale * up @ down in the base weight's shape (for tests and small use only)."""
    up2, down2 = _factors2d(up, down)
    return (scale * (up2 @ down2)).reshape(_weight_shape(up, down))


def _gram_trace(up2: Tensor, down2: Tensor) -> float:
    """||up2 @ down2||_F^2 = trace((up2^T up2)(down2 down2^T)): two k x k Gram products, never out x in."""
    return max(0.0, float(((up2.transpose(0, 1) @ up2) * (down2 @ down2.transpose(0, 1))).sum()))


def delta_norm(up: Tensor, down: Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> float:
    """||dW||_F = ||scale * up @ down||_F from the factors, the Gram products in `dtype`.

    float64 (the default) for shares and ratios; float32 agrees with it to ~1e-6 relative (test) at
    about half the cost, enough for a report's norms.
    """
    up2, down2 = _factors2d(up, down)
    return abs(scale) * math.sqrt(_gram_trace(up2.to(dtype), down2.to(dtype)))


def _check_bases(u: Tensor, v: Tensor, up2: Tensor, down2: Tensor) -> None:
    if u.shape[0] != up2.shape[0] or v.shape[0] != down2.shape[1] or u.shape[1] != v.shape[1]:
        raise ValueError(f"bases u {tuple(u.shape)} / v {tuple(v.shape)} do not fit factors "
                         f"up {tuple(up2.shape)} / down {tuple(down2.shape)}")


def d_from_factors(u: Tensor, v: Tensor, up: Tensor, down: Tensor, scale: float = 1.0) -> Tensor:
    """d = diag(U^T (scale * up @ down) V), an r-vector; sign-invariant in each (u_i, v_i) pair.

    Computed as rowwise sums of (U^T up) * (down V)^T, never forming the out x in product.
    """
    up2, down2 = _factors2d(up, down)
    _check_bases(u, v, up2, down2)
    a = u.to(up2.dtype).transpose(0, 1) @ up2          # (r, k)
    b = down2 @ v.to(down2.dtype)                      # (k, r)
    return scale * (a * b.transpose(0, 1)).sum(dim=1)


def project_factors(up: Tensor, down: Tensor, u_t: Tensor, v_t: Tensor,
                    scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Paper Eq. 3 from factors: dW_t = U_t U_t^T dW V_t V_t^T = (U_t C) V_t^T.

    C = (U_t^T up)(down V_t) * scale is r x r. Returns (up_t = U_t C, down_t = V_t^T), shaped like
    the inputs ((out, r, 1, 1) / (r, in, kh, kw) for convs), so up_t @ down_t is dW_t with scale 1.
    """
    up2, down2 = _factors2d(up, down)
    _check_bases(u_t, v_t, up2, down2)
    u_t = u_t.to(up2.dtype)
    v_t = v_t.to(down2.dtype)
    c = scale * ((u_t.transpose(0, 1) @ up2) @ (down2 @ v_t))
    up_t = u_t @ c
    down_t = v_t.transpose(0, 1).contiguous()
    r = up_t.shape[1]
    if up.dim() == 4:
        up_t = up_t.reshape(up_t.shape[0], r, 1, 1)
    if down.dim() == 4:
        down_t = down_t.reshape(r, *down.shape[1:])
    return up_t, down_t


def energy_in_subspace(up: Tensor, down: Tensor, u: Tensor, v: Tensor, scale: float = 1.0) -> float:
    """||U U^T dW V V^T||_F / ||dW||_F, in [0, 1], from the factors (scale cancels).

    Numerator = ||(U^T up)(down V)||_F (U, V orthonormal); denominator^2 = trace((up^T up)(down down^T)).
    A zero dW loses nothing and gives 1.0.
    """
    up2, down2 = _factors2d(up, down)
    _check_bases(u, v, up2, down2)
    up64, down64 = up2.to(torch.float64), down2.to(torch.float64)
    inside = (u.to(torch.float64).transpose(0, 1) @ up64) @ (down64 @ v.to(torch.float64))
    num2 = float((inside * inside).sum())
    den2 = _gram_trace(up64, down64)
    if den2 <= 0.0:
        return 1.0
    return min(1.0, max(0.0, num2 / den2) ** 0.5)


def lorax_factors(bases: Bases, d: Tensor, weight_shape: tuple[int, ...] | torch.Size | None = None
                  ) -> tuple[Tensor, Tensor]:
    """(up, down) = (U diag(d), V^T) of a LoRA-X adapter, reshaped for a conv weight shape if given."""
    if d.shape != bases.s.shape:
        raise ValueError(f"d has shape {tuple(d.shape)}, bases have rank {bases.rank}")
    up = bases.u * d.to(bases.u.dtype).unsqueeze(0)
    down = bases.v.transpose(0, 1).contiguous()
    if weight_shape is not None and len(weight_shape) == 4:
        out, cin, kh, kw = weight_shape
        if out != up.shape[0] or cin * kh * kw != down.shape[1]:
            raise ValueError(f"bases u {tuple(bases.u.shape)} / v {tuple(bases.v.shape)} do not fit weight "
                             f"shape {tuple(weight_shape)}")
        up = up.reshape(out, bases.rank, 1, 1)
        down = down.reshape(bases.rank, cin, kh, kw)
    return up, down
