"""Tensor recipes for synthetic checkpoints: seeded initial weights and fine-tune-like drift.

No I/O. Every tensor is seeded from (seed, key) alone, so a fixture can be written tensor by tensor
in any order and the same key gets the same values in every layout.
"""

from __future__ import annotations

import hashlib

import torch

SPECTRA = ("init", "decaying")
# share of the drift's energy that is low-rank (the rest is full-rank noise)
LOW_RANK_SHARE = 0.9


def key_generator(seed: int, key: str, salt: str = "") -> torch.Generator:
    """A torch generator seeded from (seed, key, salt) by a stable hash."""
    digest = hashlib.sha256(f"{seed}\0{salt}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


def init_tensor(key: str, shape: tuple[int, ...], seed: int, spectrum: str = "init") -> torch.Tensor:
    """A float32 tensor for a parameter named `key`.

    Matrices and convolutions: Gaussian scaled by 1/sqrt(fan_in) ("init"), or with a power-law
    decaying singular spectrum of the same Frobenius norm ("decaying"). 1-D weights (norms) are
    near 1, biases near 0, embeddings small.
    """
    if spectrum not in SPECTRA:
        raise ValueError(f"unknown spectrum {spectrum!r}; expected one of {SPECTRA}")
    g = key_generator(seed, key)
    shape = tuple(shape)
    if len(shape) == 0:
        return torch.ones(())
    if len(shape) == 1:
        noise = torch.randn(shape, generator=g) * 0.02
        return noise + 1.0 if key.endswith("weight") else noise
    if "embedding" in key:  # token / position embeddings
        return torch.randn(shape, generator=g) * 0.02
    out, fan_in = shape[0], int(torch.tensor(shape[1:]).prod())
    if spectrum == "init" or min(out, fan_in) < 2:
        return torch.randn(shape, generator=g) / fan_in ** 0.5
    return decaying_matrix(out, fan_in, g).reshape(shape)


def decaying_matrix(out: int, fan_in: int, g: torch.Generator, power: float = 1.0) -> torch.Tensor:
    """An (out, fan_in) matrix whose singular values fall off roughly as i^-power, Frobenius norm
    sqrt(out) (that of the "init" recipe). Cheap: two random factors, no SVD."""
    k = min(out, fan_in)
    a = torch.randn(out, k, generator=g)
    b = torch.randn(k, fan_in, generator=g)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -power
    w = (a * s) @ b
    return w * (out ** 0.5 / w.norm())


def drift_tensor(w: torch.Tensor, drift: float, key: str, seed: int) -> torch.Tensor:
    """`w` moved by a seeded perturbation of relative Frobenius size `drift`, mostly low-rank.

    The low-rank part (rank ~ min(out, in)/16, at least 1) turns the top singular subspaces the
    way a fine-tune does; a little full-rank noise keeps the rest from being untouched. Computed in
    float32 and cast back to `w`'s dtype.
    """
    w32 = w.float()
    norm = w32.norm()
    if drift == 0 or norm == 0 or w.dim() < 2:
        return w.clone()
    out, fan_in = w.shape[0], w32[0].numel()
    g = key_generator(seed, key, "drift")
    k = max(1, min(out, fan_in) // 16)
    low = torch.randn(out, k, generator=g) @ torch.randn(k, fan_in, generator=g)
    noise = torch.randn(out, fan_in, generator=g)
    p = LOW_RANK_SHARE ** 0.5 * low / low.norm() + (1 - LOW_RANK_SHARE) ** 0.5 * noise / noise.norm()
    p = p * (drift * norm / p.norm())
    return (w32 + p.reshape(w.shape)).to(w.dtype)
