"""networks.lora_x driven call by call the way kohya's train_network.py drives a network module.

The order and the argument shapes follow docs/kohya-contract.md §1.2 (train_network.py HEAD):
create_network with string network_args plus the injected `dropout`, hasattr checks,
prepare_network, apply_to, load_weights (--network_weights), enable_gradient_checkpointing,
prepare_optimizer_params, accelerator.prepare, prepare_grad_etc, on_epoch_start, on_step_start, a
real training step through the patched models, clip_grad_norm_ over get_trainable_params,
save_weights with kohya-style metadata; then --base_weights (create_network_from_weights with
for_inference=True + merge_to) and --dim_from_weights.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from sd_scripts_lorax.families.model_configs import build_models

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=None)
def _built(family: str):
    return build_models(family, "tiny", seed=0)


def _models(family: str):
    return copy.deepcopy(_built(family))


def _kohya_te_arg(models):
    # kohya: one CLIPTextModel for SD1/2, a list [te1, te2] for SDXL
    return models.text_encoders if models.family == "sdxl" else models.text_encoders[0]


def _training_step(models, accelerator, seed: int) -> torch.Tensor:
    """One kohya-like step: encode captions, noise latents, predict, MSE loss; returns the loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 77), generator=g)
    unet = models.unet
    cfg = unet.config
    with accelerator.autocast():
        outs = [te(ids, output_hidden_states=True) for te in models.text_encoders]
        if models.family == "sdxl":
            ctx = torch.cat([outs[0].hidden_states[-2], outs[1].hidden_states[-2]], dim=-1)
            added = {"text_embeds": outs[1].text_embeds, "time_ids": torch.tensor([[8., 8., 0., 0., 8., 8.]] * 2)}
        else:
            ctx, added = outs[0].last_hidden_state, None
        latents = torch.randn(2, 4, cfg.sample_size, cfg.sample_size, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        noisy = (latents + noise).requires_grad_(True)  # kohya: so the frozen base keeps the graph
        pred = unet(noisy, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    return F.mse_loss(pred.float(), noise.float())


def _kohya_metadata(family: str) -> dict[str, str]:
    return {
        "ss_session_id": "1234", "ss_training_started_at": "1700000000", "ss_output_name": "my_lorax",
        "ss_learning_rate": "0.0001", "ss_text_encoder_lr": "[1e-05]", "ss_unet_lr": "0.0001",
        "ss_network_module": "networks.lora_x", "ss_network_dim": "4", "ss_network_alpha": "1.0",
        "ss_network_args": json.dumps({"conv_dim": "2", "dropout": None}), "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0" if family == "sdxl" else "sd_v1",
        "ss_sd_model_name": "tiny.safetensors", "ss_new_sd_model_hash": "ab" * 32, "ss_steps": "1",
        "modelspec.sai_model_spec": "1.0.1",
    }


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one global state per process; each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.mark.parametrize("family,mixed", [("sd1", "no"), ("sdxl", "bf16")])
def test_train_network_call_sequence(family: str, mixed: str, tmp_path, fresh_accelerate_state) -> None:
    from accelerate import Accelerator

    network_module = importlib.import_module("networks.lora_x")
    models = _models(family)
    te, unet, vae = _kohya_te_arg(models), models.unet, models.vae
    for m in models.text_encoders + [unet]:
        m.requires_grad_(False)

    # --- a first run, saved: the --network_weights file the second run resumes from
    first = network_module.create_network(1.0, 4, 1.0, vae, te, unet, neuron_dropout=None,
                                          conv_dim="2", dropout=None)
    first.apply_to(te, unet, True, True)
    with torch.no_grad():
        for i, m in enumerate(first.applied_loras()):
            m.d.fill_(0.01 * (i % 5 - 2))
    resume = tmp_path / "resume.safetensors"
    first.save_weights(str(resume), None, {})
    expected_d = {m.lora_name: m.d.detach().clone() for m in first.applied_loras()}
    for m in first.applied_loras():
        m.restore()

    # 1. create_network: network_args as strings, plus the dropout kohya injects
    net_kwargs = {"conv_dim": "2", "svd_method": "auto"}
    net_kwargs.setdefault("dropout", None)
    network = network_module.create_network(1.0, 4, 1.0, vae, te, unet, neuron_dropout=None, **net_kwargs)
    assert network is not None
    # 2-4. hasattr checks and prepare_network(args)
    assert hasattr(network, "set_multiplier")
    network.prepare_network(SimpleNamespace(network_module="networks.lora_x"))
    assert hasattr(network, "apply_max_norm_regularization")
    # 5. apply_to
    network.apply_to(te, unet, True, True)
    # 6. --network_weights
    info = network.load_weights(str(resume))
    assert info["lorax"] and info["loaded"] == len(expected_d)
    for m in network.applied_loras():
        torch.testing.assert_close(m.d.detach(), expected_d[m.lora_name])
    # 7. --gradient_checkpointing
    unet.enable_gradient_checkpointing()
    network.enable_gradient_checkpointing()
    # 8. optimizer params: HEAD passes the first --text_encoder_lr of a list; retried on TypeError
    assert not hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs")
    params = network.prepare_optimizer_params([1e-3], 1e-2, 1e-4)
    assert isinstance(params, list) and [g["lr"] for g in params] == [1e-3, 1e-2]
    optimizer = torch.optim.AdamW(params)
    # 10. accelerator.prepare
    accelerator = Accelerator(cpu=True, mixed_precision=mixed)
    network, optimizer = accelerator.prepare(network, optimizer)
    unwrapped = accelerator.unwrap_model(network)
    # 11. prepare_grad_etc; 14. on_epoch_start(te, unet) with two positional args; 13. on_step_start
    unwrapped.prepare_grad_etc(te, unet)
    unet.train()
    unwrapped.on_epoch_start(te, unet)
    assert unwrapped.training
    unwrapped.on_step_start(te, unet)
    before = {n: p.detach().clone() for n, p in unwrapped.named_parameters()}
    loss = _training_step(models, accelerator, seed=0)
    accelerator.backward(loss)
    te_names = {m.lora_name for m in unwrapped.text_encoder_loras}
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0
               for n, p in unwrapped.named_parameters() if n[:-2] in te_names)
    # 17. clip_grad_norm_ over get_trainable_params
    accelerator.clip_grad_norm_(unwrapped.get_trainable_params(), 1.0)
    # No gradient, legitimately: to_q of self-attention over the tiny model's 1x1 mid-block latent,
    # and (SDXL) TE1's last layer, whose output kohya's penultimate-layer conditioning never uses.
    live = {n for n, p in unwrapped.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert len(live) >= 0.9 * len(before)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    changed = {n for n, p in unwrapped.named_parameters() if not torch.equal(before[n], p.detach())}
    assert live <= changed
    assert all(p.dtype == torch.float32 for p in unwrapped.parameters())  # d stays fp32 under bf16
    # 19. --scale_weight_norms
    keys_scaled, mean_norm, max_norm = unwrapped.apply_max_norm_regularization(1e9, "cpu")
    assert keys_scaled == 0 and max_norm >= mean_norm > 0
    # 15. set_multiplier; 21. eval/train around validation
    unwrapped.set_multiplier(1.0)
    unwrapped.eval()
    unwrapped.train()
    # 22. save_weights with kohya's metadata dict and --save_precision fp16
    out = tmp_path / "my_lorax.safetensors"
    metadata = _kohya_metadata(family)
    unwrapped.save_weights(str(out), torch.float16, metadata)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    for k, v in metadata.items():
        assert meta[k] == v
    assert meta["lorax.source_model_name"] == "tiny.safetensors"
    assert meta["sshs_model_hash"] and meta["sshs_legacy_hash"]
    prefixes = {k.split("_")[1] for k in keys}
    assert prefixes == ({"unet", "te1", "te2"} if family == "sdxl" else {"unet", "te"})
    assert len(keys) == 3 * len(unwrapped.applied_loras())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_base_weights_and_dim_from_weights(family: str, tmp_path) -> None:
    network_module = importlib.import_module("networks.lora_x")
    models = _models(family)
    te, unet = _kohya_te_arg(models), models.unet
    # a plain kohya LoRA (alpha != rank, not in any base subspace) on a few modules, incl. a 3x3 conv
    probe = network_module.create_network(1.0, 3, None, None, te, unet, conv_dim="2")
    chosen = [m for m in probe.all_loras() if m.is_conv and m.down.dim() == 4 and m.down.shape[-1] == 3][:1]
    chosen += [m for m in probe.all_loras() if not m.is_conv][:2] + probe.text_encoder_loras[-1:]
    g = torch.Generator().manual_seed(0)
    sd, expected = {}, {}
    for m in chosen:
        w = m.base.weight
        down = torch.randn(3, *w.shape[1:], generator=g)
        up = torch.randn(w.shape[0], 3, *([1, 1] if w.dim() == 4 else []), generator=g)
        sd.update({f"{m.lora_name}.lora_down.weight": down, f"{m.lora_name}.lora_up.weight": up,
                   f"{m.lora_name}.alpha": torch.tensor(1.5)})
        full = (up.double().reshape(w.shape[0], -1) @ down.double().reshape(3, -1)) * (1.5 / 3)
        expected[m.lora_name] = (w.detach().double() + 0.7 * full.reshape(w.shape), w)
    plain = tmp_path / "plain.safetensors"
    save_file(sd, str(plain), {"ss_network_module": "networks.lora"})

    # --base_weights plain.safetensors --base_weights_multiplier 0.7
    net, weights_sd = network_module.create_network_from_weights(0.7, str(plain), None, te, unet, for_inference=True)
    assert set(weights_sd) == set(sd)
    untouched = [p.detach().clone() for p in unet.parameters()]
    net.merge_to(te, unet, weights_sd, torch.float32, "cpu")
    for want, w in expected.values():
        torch.testing.assert_close(w.detach().double(), want, rtol=1e-5, atol=1e-5)  # full update, not projected
    changed = sum(not torch.equal(a, b) for a, b in zip(untouched, unet.parameters()))
    assert changed == sum(1 for m in chosen if m.lora_name.startswith("lora_unet"))
    assert not any("forward" in m.__dict__ for m in unet.modules())  # merge patches nothing

    # --dim_from_weights: ranks from the file, then apply_to + load_weights as usual
    net2, _ = network_module.create_network_from_weights(1.0, str(plain), None, te, unet, conv_dim="2", dropout=None)
    net2.apply_to(te, unet, True, True)
    assert {m.lora_name: m.rank for m in net2.applied_loras()} == {m.lora_name: 3 for m in chosen}
    info = net2.load_weights(str(plain))
    assert not info["lorax"] and info["loaded"] == len(chosen)


def test_import_error_tells_to_install(tmp_path) -> None:
    code = ("import sys; sys.modules['sd_scripts_lorax'] = None\n"
            "try:\n    import networks.lora_x\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "pip install" in out.stdout and "sd-scripts-lorax" in out.stdout
