"""LoraXNetwork on tiny SD1 and SDXL diffusers models: targets, names, math, files, diffusers loading."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from safetensors import safe_open
from torch import nn

from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.families.model_configs import build_models
from sd_scripts_lorax.network.lorax_network import create_network, create_network_from_weights


# 2 shared cores: one intra-op thread avoids oversubscription (10x faster here under load).
torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _built(family: str):
    return build_models(family, "tiny", seed=0)


def _models(family: str):
    """A fresh copy of the tiny models (built once per family)."""
    return copy.deepcopy(_built(family))


def _unet_inputs(models, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = models.unet.config
    x = torch.randn(batch, 4, cfg.sample_size, cfg.sample_size, generator=g)
    ctx = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}
    return x, torch.tensor([500] * batch), ctx, kwargs


def _run_unet(unet, inputs):
    x, t, ctx, kwargs = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx, **kwargs).sample


def _expected_targets(models, conv: bool) -> dict[int, nn.Module]:
    """Independent walk of kohya's targeting rule (class names), keyed by id."""
    out = {}
    unet_classes = {"Transformer2DModel"} | ({"ResnetBlock2D", "Downsample2D", "Upsample2D"} if conv else set())
    for root, classes in [(models.unet, unet_classes)] + [(te, {"CLIPAttention", "CLIPMLP"})
                                                          for te in models.text_encoders]:
        for m in root.modules():
            if type(m).__name__ in classes:
                for c in m.modules():
                    if type(c).__name__ in ("Linear", "Conv2d"):
                        k = c.weight.shape[2:] if c.weight.dim() == 4 else ()
                        if conv or all(s == 1 for s in k):
                            out[id(c)] = c
    return out


def _random_d(network, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.applied_loras():
            m.d.copy_(torch.randn(m.rank, generator=g) * 0.5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_params_names_identity_and_merge(family: str) -> None:
    models = _models(family)
    rank, conv_rank = 6, 3
    te_arg = models.text_encoders if family == "sdxl" else models.text_encoders[0]
    inputs = _unet_inputs(models)
    ref = _run_unet(models.unet, inputs)
    net = create_network(1.0, str(rank), "1", models.vae, te_arg, models.unet, neuron_dropout=None,
                         conv_dim=str(conv_rank), dropout=None)
    net.apply_to(te_arg, models.unet, True, True)
    expected = _expected_targets(models, conv=True)
    assert len(net.applied_loras()) == len(expected)
    want_params = 0
    for c in expected.values():
        k = c.weight.shape[2:] if c.weight.dim() == 4 else ()
        r = conv_rank if any(s > 1 for s in k) else rank
        want_params += min(r, c.weight.shape[0], c.weight[0].numel())
    assert sum(p.numel() for p in net.get_trainable_params()) == want_params
    # state dict: exactly "<lora_name>.d", no base weights
    keys = list(net.state_dict())
    assert all(k.endswith(".d") and k.count(".") == 1 for k in keys)
    assert len(keys) == len(expected)
    names = {k[:-2] for k in keys}
    if family == "sd1":
        assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names
        assert "lora_unet_down_blocks_0_resnets_0_conv1" in names
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    else:
        assert "lora_unet_input_blocks_4_1_proj_in" in names
        assert "lora_unet_input_blocks_1_0_in_layers_2" in names
        assert "lora_unet_input_blocks_3_0_op" in names
        assert "lora_unet_output_blocks_2_2_conv" in names
        assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0" in names
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
        assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    # d = 0: the base exactly
    assert torch.equal(_run_unet(models.unet, inputs), ref)

    # random d: equals a copy of the base with W + U diag(d) V^T merged (independently built)
    _random_d(net)
    for m in net.unet_loras:
        m.restore()  # the deep copy must hold plain forwards; re-patched below
    merged = copy.deepcopy(models.unet)
    path_of = {id(mod): name for name, mod in models.unet.named_modules()}
    merged_mods = dict(merged.named_modules())
    for m in net.unet_loras:
        w = merged_mods[path_of[id(m.base)]].weight
        u = m.u.double()
        v = m.down.double().reshape(m.rank, -1).t()
        dw = (u * m.d.detach().double()) @ v.t()
        with torch.no_grad():
            w.copy_((w.double() + dw.reshape(w.shape)).float())
        m.apply_to()
    got = _run_unet(models.unet, inputs)
    want = _run_unet(merged, inputs)
    assert ((got - want).norm() / want.norm()) < 1e-5
    assert not torch.allclose(got, ref)


def test_bases_are_top_singular_vectors() -> None:
    models = _models("sd1")
    net = create_network(1.0, 4, None, None, models.text_encoders, models.unet)
    for m in net.all_loras()[:5] + net.all_loras()[-3:]:
        w = m.base.weight.detach().double().reshape(m.base.weight.shape[0], -1)
        u_ref, _, vh_ref = torch.linalg.svd(w, full_matrices=False)
        # same subspaces, up to sign: |U^T U_ref| is the identity on the top-r block
        cu = (m.u.double().t() @ u_ref[:, :m.rank]).abs()
        cv = (m.down.double().reshape(m.rank, -1) @ vh_ref[:m.rank].t()).abs()
        torch.testing.assert_close(cu, torch.eye(m.rank, dtype=torch.float64), atol=1e-4, rtol=0)
        torch.testing.assert_close(cv, torch.eye(m.rank, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_save_load_roundtrip_and_file_layout(family: str, tmp_path) -> None:
    models = _models(family)
    te_arg = models.text_encoders if family == "sdxl" else models.text_encoders
    net = create_network(1.0, 5, None, None, te_arg, models.unet, conv_dim="2")
    net.apply_to(te_arg, models.unet)
    _random_d(net, seed=3)
    path = tmp_path / "x.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_dim": "5"})
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        m = net.unet_loras[0]
        assert f.get_tensor(f"{m.lora_name}.alpha").item() == m.rank
        up = f.get_tensor(f"{m.lora_name}.lora_up.weight")
        down = f.get_tensor(f"{m.lora_name}.lora_down.weight")
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert len(keys) == 3 * len(net.applied_loras())
    assert meta["ss_network_module"] == "networks.lora_x" and meta["ss_network_dim"] == "5"
    assert any(k.startswith("lorax.") for k in meta) and "sshs_model_hash" in meta
    # up @ down is U diag(d) V^T
    dw = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    want = (m.u * m.d.detach()) @ m.down.reshape(m.rank, -1)
    torch.testing.assert_close(dw, want, rtol=1e-5, atol=1e-6)

    fresh = create_network(1.0, 5, None, None, te_arg, models.unet, conv_dim="2")
    fresh.apply_to(te_arg, models.unet)
    info = fresh.load_weights(str(path))
    assert info["loaded"] == len(net.applied_loras())
    for a, b in zip(net.applied_loras(), fresh.applied_loras()):
        assert a.lora_name == b.lora_name
        torch.testing.assert_close(b.d, a.d, rtol=1e-5, atol=1e-6)


def test_plain_lora_projection_and_energy(tmp_path, caplog) -> None:
    from safetensors.torch import save_file
    models = _models("sd1")
    net = create_network(1.0, 4, None, None, models.text_encoders[0], models.unet)
    net.apply_to(models.text_encoders[0], models.unet)
    g = torch.Generator().manual_seed(0)
    sd = {}
    picked = net.applied_loras()[:3]
    for m in picked:
        w = m.base.weight
        sd[f"{m.lora_name}.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=g)
        sd[f"{m.lora_name}.lora_up.weight"] = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []),
                                                          generator=g)
        sd[f"{m.lora_name}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "plain.safetensors"
    save_file(sd, str(path), {"ss_network_module": "networks.lora"})
    with caplog.at_level(logging.WARNING):
        info = net.load_weights(str(path))
    assert not info["lorax"] and 0.0 < info["energy_in_subspace"] < 1.0
    assert info["energy_kept"] <= info["energy_in_subspace"] + 1e-9
    assert "not a LoRA-X file" in caplog.text
    for m in picked:
        up = sd[f"{m.lora_name}.lora_up.weight"].double().reshape(m.base.weight.shape[0], -1)
        down = sd[f"{m.lora_name}.lora_down.weight"].double().reshape(2, -1)
        dw = up @ down * 0.5
        v = m.down.double().reshape(m.rank, -1).t()
        want = torch.diagonal(m.u.double().t() @ dw @ v)
        torch.testing.assert_close(m.d.detach().double(), want, rtol=1e-4, atol=1e-6)


def test_bad_inputs(tmp_path) -> None:
    models = _models("sd1")
    te = models.text_encoders[0]
    for bad in ("0", "-3", "abc"):
        with pytest.raises(LoraxInputError, match="network_dim"):
            create_network(1.0, bad, None, None, te, models.unet)
    with pytest.raises(LoraxInputError, match="conv_dim"):
        create_network(1.0, 4, None, None, te, models.unet, conv_dim="three")
    # NaN in a base weight: clear error naming the module, nothing patched
    broken = copy.deepcopy(models.unet)
    w = broken.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_k.weight
    with torch.no_grad():
        w[0, 0] = float("nan")
    with pytest.raises(LoraxInputError, match="down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.*NaN"):
        create_network(1.0, 4, None, None, te, broken)
    assert not any("forward" in m.__dict__ for m in broken.modules())
    # a LoRA file whose keys do not fit: one error naming them, nothing loaded
    from safetensors.torch import save_file
    net = create_network(1.0, 4, None, None, te, models.unet)
    net.apply_to(te, models.unet)
    good = net.applied_loras()[0]
    sd = {f"{good.lora_name}.lora_down.weight": torch.ones(4, *good.base.weight.shape[1:]),
          f"{good.lora_name}.lora_up.weight": torch.ones(good.base.weight.shape[0], 4,
                                                         *([1, 1] if good.base.weight.dim() == 4 else [])),
          f"{good.lora_name}.alpha": torch.tensor(4.0),
          "lora_unet_nowhere_to_q.lora_down.weight": torch.ones(4, 8),
          "lora_unet_nowhere_to_q.lora_up.weight": torch.ones(8, 4),
          "lora_unet_nowhere_to_q.alpha": torch.tensor(4.0)}
    path = tmp_path / "wrong.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraxInputError, match="lora_unet_nowhere_to_q"):
        net.load_weights(str(path))
    assert float(good.d.detach().abs().sum()) == 0.0
    with pytest.raises(LoraxInputError, match="lora_unet_nowhere_to_q"):
        create_network_from_weights(1.0, str(path), None, te, models.unet)


def test_svd_cache_and_optimizer_groups(tmp_path) -> None:
    models = _models("sd1")
    te = [models.text_encoders[0]]
    cache = tmp_path / "cache"
    a = create_network(1.0, 4, None, None, te, models.unet, svd_cache_dir=str(cache), svd_device="cpu")
    assert not cache.exists() or not any(cache.iterdir()), "bases are computed on first use, not at creation"
    a.prepare_grad_etc(te, models.unet)  # kohya calls this once before its loop
    assert any(cache.iterdir())
    b = create_network(1.0, 4, None, None, te, models.unet, svd_cache_dir=str(cache))
    for x, y in zip(a.all_loras(), b.all_loras()):
        assert torch.equal(x.u, y.u) and torch.equal(x.down, y.down)
    b.apply_to(te, models.unet, apply_text_encoder=True, apply_unet=True)
    # a list of one text encoder (gen_img.py passes that for SD1) keeps kohya's "lora_te_" prefix
    assert b.text_encoder_loras and all(m.lora_name.startswith("lora_te_text_model_") for m in b.text_encoder_loras)
    groups = b.prepare_optimizer_params([1e-5], 1e-4, 1e-3)
    assert isinstance(groups, list) and [g["lr"] for g in groups] == [1e-5, 1e-4]
    assert [g["lr"] for g in b.prepare_optimizer_params(None, None, 2e-4)] == [2e-4, 2e-4]
    only_unet = b.prepare_optimizer_params(0, 1e-4, 1e-3)
    assert len(only_unet) == 1 and len(only_unet[0]["params"]) == len(b.unet_loras)
    # max-norm: ||dW|| = ||d||
    with torch.no_grad():
        b.unet_loras[0].d.fill_(10.0)
    scaled, mean, mx = b.apply_max_norm_regularization(1.0, "cpu")
    assert scaled == 1 and mx == pytest.approx(1.0, rel=1e-5)
    m = b.unet_loras[0]
    dw = (m.u.double() * m.d.detach().double()) @ m.down.double().reshape(m.rank, -1)
    assert float(dw.norm()) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_load_lora_weights_matches(family: str, tmp_path) -> None:
    """An independent consumer (diffusers + peft) loads our file and computes the same outputs."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from sd_scripts_lorax.testing.tiny_tokenizer import write_tokenizer

    ours, theirs = _models(family), _models(family)
    inputs = _unet_inputs(ours)
    ids = torch.randint(0, 100, (1, 77), generator=torch.Generator().manual_seed(0))
    base_unet = _run_unet(ours.unet, inputs)
    with torch.no_grad():
        base_te = ours.text_encoders[-1](ids).last_hidden_state
    net = create_network(1.0, 4, None, None, ours.text_encoders, ours.unet, conv_dim="2")
    net.apply_to(ours.text_encoders, ours.unet)
    _random_d(net, seed=5)
    path = tmp_path / f"{family}.safetensors"
    net.save_weights(str(path), None, {})

    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tok")))
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=theirs.vae, text_encoder=theirs.text_encoders[0],
                                         text_encoder_2=theirs.text_encoders[1], tokenizer=tok, tokenizer_2=tok,
                                         unet=theirs.unet, scheduler=DDPMScheduler())
    else:
        pipe = StableDiffusionPipeline(vae=theirs.vae, text_encoder=theirs.text_encoders[0], tokenizer=tok,
                                       unet=theirs.unet, scheduler=DDPMScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    # every module of ours became a peft LoRA layer there: nothing was silently dropped
    peft_layers = sum(1 for m in [pipe.unet, *theirs.text_encoders] for x in m.modules() if hasattr(x, "lora_A"))
    assert peft_layers == len(net.applied_loras())

    got, want = _run_unet(pipe.unet, inputs), _run_unet(ours.unet, inputs)
    assert ((got - want).norm() / want.norm()) < 1e-4
    assert ((want - base_unet).norm() / base_unet.norm()) > 1e-2
    with torch.no_grad():
        got_te = theirs.text_encoders[-1](ids).last_hidden_state
        want_te = ours.text_encoders[-1](ids).last_hidden_state
    assert ((got_te - want_te).norm() / want_te.norm()) < 1e-4
    assert ((want_te - base_te).norm() / base_te.norm()) > 1e-2


def test_sdxl_diffusers_style_names_and_unet_only(tmp_path) -> None:
    """SDXL files with diffusers-style UNet names load (as kohya converts them); a UNet-only network
    skips the text-encoder modules of a file instead of failing."""
    from safetensors.torch import load_file, save_file
    models = _models("sdxl")
    net = create_network(1.0, 3, None, None, models.text_encoders, models.unet)
    net.apply_to(models.text_encoders, models.unet)
    _random_d(net, seed=7)
    path = tmp_path / "sai.safetensors"
    net.save_weights(str(path), None, {})
    path_of = {id(mod): name for name, mod in models.unet.named_modules()}
    rename = {m.lora_name: "lora_unet_" + path_of[id(m.base)].replace(".", "_") for m in net.unet_loras}
    assert any(k != v for k, v in rename.items())
    sd = load_file(str(path))
    renamed = {}
    for k, t in sd.items():
        name, _, suffix = k.partition(".")
        renamed[f"{rename.get(name, name)}.{suffix}"] = t
    diffusers_style = tmp_path / "diffusers_style.safetensors"
    save_file(renamed, str(diffusers_style), {"ss_network_module": "networks.lora_x"})

    fresh = create_network(1.0, 3, None, None, models.text_encoders, models.unet)
    fresh.apply_to(models.text_encoders, models.unet, apply_text_encoder=False, apply_unet=True)
    info = fresh.load_weights(str(diffusers_style))
    assert info["loaded"] == len(net.unet_loras) and len(info["skipped"]) == len(net.text_encoder_loras)
    want = {m.lora_name: m.d.detach() for m in net.unet_loras}
    for m in fresh.applied_loras():
        torch.testing.assert_close(m.d.detach(), want[m.lora_name], rtol=1e-5, atol=1e-6)
    assert all(k.startswith("lora_unet_") for k in fresh.state_dict())
    # create_network_from_weights accepts the diffusers-style names too
    again, _ = create_network_from_weights(1.0, str(diffusers_style), None, models.text_encoders, models.unet)
    assert {m.lora_name for m in again.unet_loras} == set(want)


def test_nan_weights_refused_with_warm_cache_and_lazily(tmp_path) -> None:
    """A changed (Inf) weight is refused at creation, warm cache or not, and nothing is cached for it."""
    models = _models("sd1")
    te = models.text_encoders[0]
    cache = tmp_path / "cache"
    create_network(1.0, 4, None, None, te, models.unet, svd_cache_dir=str(cache)).resolve_bases()
    entries = sorted(p.name for p in cache.iterdir())
    net = create_network(1.0, 4, None, None, te, models.unet, svd_cache_dir=str(cache))
    net.resolve_bases()  # all hits
    assert sorted(p.name for p in cache.iterdir()) == entries and net.all_loras()
    path = tmp_path / "x.safetensors"
    net.save_weights(path)
    for where in ("unet", "te"):
        broken = copy.deepcopy(models)
        layer = (broken.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_k if where == "unet"
                 else broken.text_encoders[0].encoder.layers[0].mlp.fc2)
        with torch.no_grad():
            layer.weight[1, 2] = float("inf")
        name = "attn1_to_k" if where == "unet" else "layers_0_mlp_fc2"
        with pytest.raises(LoraxInputError, match=f"{name} weight .* contains Inf"):
            create_network(1.0, 4, None, None, broken.text_encoders[0], broken.unet, svd_cache_dir=str(cache))
        with pytest.raises(LoraxInputError, match=f"{name} weight .* contains Inf"):
            create_network_from_weights(1.0, path, None, broken.text_encoders[0], broken.unet, for_inference=True)
        assert not any("forward" in m.__dict__ for m in broken.unet.modules())
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing cached for the bad weights


def test_kohya_injected_dropout_is_read_not_warned(caplog):
    from sd_scripts_lorax.network.lorax_network import parse_options

    with caplog.at_level(logging.WARNING):
        assert parse_options(8, None, None, {"dropout": None}).dropout is None
        assert parse_options(8, None, None, {"dropout": "0.1"}).dropout == pytest.approx(0.1)
        assert parse_options(8, None, "0.2", {"dropout": "0.1"}).dropout == pytest.approx(0.2)
    assert "ignoring" not in caplog.text
    with caplog.at_level(logging.WARNING):
        parse_options(8, None, None, {"dropout": None, "rank_dropout": "0.1"})
    assert "rank_dropout" in caplog.text
