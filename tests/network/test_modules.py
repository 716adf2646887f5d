"""LoraXModule: patching, the forward against a dense computation, merge/restore, mixed precision."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd_scripts_lorax.network.layer import LoraXModule

torch.set_num_threads(1)


def _svd_bases(weight: torch.Tensor, rank: int) -> SimpleNamespace:
    """Independent top-r bases (plain torch SVD, no sign fixing: the module must not care)."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, *w.shape)
    return SimpleNamespace(u=u[:, :r].float(), s=s[:r].float(), v=vh[:r].t().float())


def _layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(24, 40), torch.randn(3, 5, 24)),
        "conv1x1": (nn.Conv2d(16, 12, 1), torch.randn(2, 16, 6, 6)),
        "conv3x3": (nn.Conv2d(8, 12, 3, padding=1), torch.randn(2, 8, 7, 7)),
        "conv3x3_stride2": (nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.randn(2, 8, 9, 9)),
        "conv3x3_reflect": (nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect"), torch.randn(1, 8, 5, 5)),
    }


@pytest.mark.parametrize("kind", list(_layers()))
def test_forward_equals_dense_merge(kind: str) -> None:
    base, x = _layers()[kind]
    rank = 6
    bases = _svd_bases(base.weight, rank)
    ref = base(x)
    mod = LoraXModule("lora_test", base, bases, multiplier=0.7)
    mod.apply_to()
    # d = 0: exactly the base
    assert torch.equal(base(x), ref)
    torch.manual_seed(1)
    with torch.no_grad():
        mod.d.normal_()
    got = base(x)
    # independent dense computation: W' = W + m U diag(d) V^T
    dw = (bases.u.double() * mod.d.detach().double()) @ bases.v.double().t()
    w2 = (base.weight.double().reshape(dw.shape) + 0.7 * dw).reshape(base.weight.shape)
    if isinstance(base, nn.Linear):
        want = F.linear(x.double(), w2, base.bias.double())
    else:
        conv = nn.Conv2d(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         padding_mode=base.padding_mode).double()
        with torch.no_grad():
            conv.weight.copy_(w2)
            conv.bias.copy_(base.bias.double())
        want = conv(x.double())
    rel = (got.double() - want).norm() / want.norm()
    assert rel < 1e-5, rel
    assert not torch.equal(got, ref)
    # merge folds the same update into the weight and unpatches
    mod.merge_to()
    assert "forward" not in base.__dict__
    merged = base(x)
    assert ((merged.double() - want).norm() / want.norm()) < 1e-5


def test_not_registered_and_state_dict_only_d() -> None:
    base = nn.Linear(10, 8)
    mod = LoraXModule("n", base, _svd_bases(base.weight, 4))
    mod.apply_to()
    assert list(mod.state_dict()) == ["d"]
    assert [n for n, _ in mod.named_parameters()] == ["d"]
    assert list(mod.children()) == []
    assert mod.d.dtype == torch.float32 and mod.d.requires_grad
    assert not mod.u.requires_grad and not mod.down.requires_grad
    assert float(mod.d.detach().abs().sum()) == 0.0


def test_restore_disable_multiplier() -> None:
    base, x = _layers()["linear"]
    ref = base(x)
    mod = LoraXModule("n", base, _svd_bases(base.weight, 4))
    mod.apply_to()
    mod.apply_to()  # idempotent
    with torch.no_grad():
        mod.d.fill_(0.5)
    out = base(x)
    assert not torch.equal(out, ref)
    mod.enabled = False
    assert torch.equal(base(x), ref)
    mod.enabled = True
    mod.multiplier = 0.0
    assert torch.equal(base(x), ref)
    mod.multiplier = 2.0
    torch.testing.assert_close(base(x) - ref, 2 * (out - ref), rtol=1e-5, atol=1e-6)
    mod.restore()
    assert torch.equal(base(x), ref)
    assert "forward" not in base.__dict__


def test_gradient_reaches_d_only() -> None:
    base, x = _layers()["conv3x3"]
    mod = LoraXModule("n", base, _svd_bases(base.weight, 5))
    mod.apply_to()
    base.requires_grad_(False)
    base(x).square().sum().backward()
    assert mod.d.grad is not None and mod.d.grad.abs().sum() > 0
    assert base.weight.grad is None


def test_autocast_keeps_d_fp32() -> None:
    base, x = _layers()["linear"]
    mod = LoraXModule("n", base, _svd_bases(base.weight, 4))
    mod.apply_to()
    with torch.no_grad():
        mod.d.fill_(0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = base(x)
    y.float().sum().backward()
    assert mod.d.dtype == torch.float32 and mod.d.grad.dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_half_base_without_autocast() -> None:
    base, x = _layers()["conv1x1"]
    bases = _svd_bases(base.weight, 4)
    base = base.to(torch.bfloat16)
    mod = LoraXModule("n", base, bases)
    assert mod.u.dtype == torch.bfloat16
    mod.apply_to()
    with torch.no_grad():
        mod.d.fill_(0.3)
    y = base(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_bad_bases_and_grouped_conv() -> None:
    base = nn.Linear(10, 8)
    wrong = SimpleNamespace(u=torch.zeros(7, 3), v=torch.zeros(10, 3))
    with pytest.raises(ValueError, match="do not fit"):
        LoraXModule("n", base, wrong)
    grouped = nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(ValueError, match="groups"):
        LoraXModule("n", grouped, _svd_bases(grouped.weight, 2))


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_grad_of_d_equals_dense_computation(kind: str, multiplier: float) -> None:
    """d.grad from the patched forward equals the gradient of the dense W + m U diag(d) V^T form."""
    base, x = _layers()[kind]
    base.requires_grad_(False)
    bases = _svd_bases(base.weight, 5)
    mod = LoraXModule("lora_test", base, bases, multiplier=multiplier)
    mod.apply_to()
    torch.manual_seed(2)
    with torch.no_grad():
        mod.d.normal_()
    target = torch.randn_like(base(x))
    F.mse_loss(base(x), target).backward()
    # dense reference in float64: loss(W(d)) with W(d) = W + m U diag(d) V^T, autograd on d only
    d = mod.d.detach().double().clone().requires_grad_(True)
    w = base.weight.double()
    dw = (bases.u.double() * d) @ bases.v.double().t()
    w2 = w + multiplier * dw.reshape(w.shape)
    if kind == "linear":
        out = F.linear(x.double(), w2, base.bias.double())
    else:
        out = F.conv2d(x.double(), w2, base.bias.double(), base.stride, base.padding)
    F.mse_loss(out, target.double()).backward()
    torch.testing.assert_close(mod.d.grad.double(), d.grad, rtol=1e-4, atol=1e-7)
