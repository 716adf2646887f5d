"""Bases are computed on first use, and a LoRA-X file saved in float32 from the same base supplies
them (checked) so that resuming (--network_weights, --dim_from_weights) runs no SVD; anything else
(fp16 storage, another base, a plain LoRA) falls back to the SVD."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from sd_scripts_lorax.families.model_configs import build_models
from sd_scripts_lorax.network import bases as network_bases
from sd_scripts_lorax.network import lorax_network
from sd_scripts_lorax.network.lorax_network import create_network, create_network_from_weights


@functools.cache
def _built():
    return build_models("sd1", "tiny", seed=0)


def _models():
    return copy.deepcopy(_built())


@pytest.fixture()
def svd_calls(monkeypatch):
    """Counts the targets whose bases were computed by SVD (not taken from a file)."""
    calls = []
    real = network_bases.compute_bases

    def counting(targets, *args, **kwargs):
        calls.extend(t.lora_name for t in targets)
        return real(targets, *args, **kwargs)

    monkeypatch.setattr(lorax_network, "compute_bases", counting)
    return calls


def _trained_file(tmp_path, models, dtype=torch.float32, name="a.safetensors"):
    te = models.text_encoders[0]
    net = create_network(1.0, 4, None, None, te, models.unet, conv_dim="2")
    net.apply_to(te, models.unet)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in net.applied_loras():
            m.d.copy_(torch.randn(m.rank, generator=gen))
    path = tmp_path / name
    net.save_weights(str(path), dtype, {})
    return net, path


def test_creation_runs_no_svd_until_first_use(svd_calls):
    models = _models()
    te = models.text_encoders[0]
    net = create_network(1.0, 4, None, None, te, models.unet)
    net.apply_to(te, models.unet)
    assert svd_calls == [] and all(m.bases_pending for m in net.applied_loras())
    x = torch.randint(0, 50, (1, 77))
    te(x)  # a forward through a patched layer resolves every module in one batch
    assert not any(m.bases_pending for m in net.applied_loras())
    assert len(svd_calls) == len(net.applied_loras())


def test_unet_only_never_decomposes_the_text_encoder(svd_calls):
    models = _models()
    te = models.text_encoders[0]
    net = create_network(1.0, 4, None, None, te, models.unet)
    net.apply_to(te, models.unet, apply_text_encoder=False, apply_unet=True)
    net.prepare_grad_etc(te, models.unet)
    assert svd_calls and all(n.startswith("lora_unet_") for n in svd_calls)


@pytest.mark.parametrize("from_weights", [False, True], ids=["network_weights", "dim_from_weights"])
def test_resume_from_own_float32_file_takes_its_bases(tmp_path, svd_calls, from_weights):
    models = _models()
    te = models.text_encoders[0]
    trained, path = _trained_file(tmp_path, models)
    svd_calls.clear()
    if from_weights:
        net, _ = create_network_from_weights(1.0, str(path), None, te, models.unet)
    else:
        net = create_network(1.0, 4, None, None, te, models.unet, conv_dim="2")
    net.apply_to(te, models.unet)
    info = net.load_weights(str(path))
    assert svd_calls == [], "the file's own bases were recomputed"
    assert info["loaded"] == len(trained.applied_loras())
    for a, b in zip(trained.applied_loras(), net.applied_loras()):
        assert a.lora_name == b.lora_name
        torch.testing.assert_close(b.u, a.u, rtol=0, atol=2e-5)
        torch.testing.assert_close(b.down, a.down, rtol=0, atol=2e-5)
        torch.testing.assert_close(b.d, a.d, rtol=1e-4, atol=1e-5)


def test_fp16_file_or_other_base_falls_back_to_svd(tmp_path, svd_calls):
    models = _models()
    te = models.text_encoders[0]
    _, half = _trained_file(tmp_path, models, torch.float16, "half.safetensors")
    svd_calls.clear()
    net = create_network(1.0, 4, None, None, te, models.unet, conv_dim="2")
    net.apply_to(te, models.unet)
    net.load_weights(str(half))
    assert len(svd_calls) == len(net.applied_loras()), "fp16-rounded bases must not be taken as they are"

    other = _models()  # the same architecture, every weight moved: the file's V is not its top subspace
    with torch.no_grad():
        for p in list(other.unet.parameters()) + list(other.text_encoders[0].parameters()):
            p.add_(torch.randn_like(p) * 0.05 * p.std())
    _, full = _trained_file(tmp_path, _models(), torch.float32, "full.safetensors")
    svd_calls.clear()
    net = create_network(1.0, 4, None, None, other.text_encoders[0], other.unet, conv_dim="2")
    net.apply_to(other.text_encoders[0], other.unet)
    net.load_weights(str(full))
    assert len(svd_calls) > 0.9 * len(net.applied_loras())


def test_half_precision_network_takes_bases_at_their_own_rounding(tmp_path, svd_calls):
    """--full_bf16: the base weights and the bases are bf16, so a file of this run holds bases at bf16
    rounding, which is all the module keeps: resuming takes them wherever they stay the same vectors,
    and the resumed network makes the update of the file."""
    models = _models()
    models.unet.to(torch.bfloat16)
    models.text_encoders[0].to(torch.bfloat16)
    te = models.text_encoders[0]
    trained, path = _trained_file(tmp_path, models)
    svd_calls.clear()
    net = create_network(1.0, 4, None, None, te, models.unet, conv_dim="2")
    net.apply_to(te, models.unet)
    net.load_weights(str(path))
    assert len(svd_calls) < 0.5 * len(net.applied_loras()), "most bf16 bases should come from the file"
    for a, b in zip(trained.applied_loras(), net.applied_loras()):
        assert b.u.dtype == torch.bfloat16
        if b.lora_name in svd_calls:
            continue  # recomputed: d is the file's update projected onto fresh bf16 bases
        torch.testing.assert_close(b.delta_weight(), a.delta_weight(), rtol=0,
                                   atol=2e-2 * float(a.delta_weight().abs().max()))
