"""How the SOURCE and TARGET models relate: relative weight change and subspace similarity."""

from __future__ import annotations

import statistics

import torch

from ...lorax import module_similarity, top_bases


def subspace_phi(a: torch.Tensor, b: torch.Tensor, rank: int = 8) -> float:
    """min(phi_U, phi_V), phi_U = ||U_a^T U_b||_F^2 / r over the top-r singular vectors (docs/design.md §2),
    from the bases and similarity the transfer uses."""
    return module_similarity(top_bases(a, rank), top_bases(b, rank)).phi


def attention_linear_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Linear weights inside the UNet's transformer blocks (kohya's default LoRA targets)."""
    out = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".transformer_blocks." in name:
            out[name] = mod.weight.detach()
    return out


def compare_unets(source: torch.nn.Module, target: torch.nn.Module, rank: int = 8) -> dict[str, float]:
    """Median phi at `rank` and median relative change ||W_t - W_s|| / ||W_s|| over attention Linears."""
    a, b = attention_linear_weights(source), attention_linear_weights(target)
    phis = [subspace_phi(a[k], b[k], rank) for k in a]
    rel = [float((b[k].float() - a[k].float()).norm() / a[k].float().norm()) for k in a]
    return {"modules": len(a), "rank": rank, "phi_median": statistics.median(phis), "phi_min": min(phis),
            "phi_max": max(phis), "share_phi_ge_0.8": sum(p >= 0.8 for p in phis) / len(phis),
            "rel_change_median": statistics.median(rel)}
