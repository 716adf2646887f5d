"""Optimizer/scheduler names, kohya's k=v argument parsing, sample-prompt options, metadata keys."""

from __future__ import annotations

import warnings

import pytest
import torch

from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.train.metadata import at_save, base_metadata, modelspec
from sd_scripts_lorax.train.optim import make_optimizer, make_scheduler, optimizer_description, warmup_steps
from sd_scripts_lorax.train.sampling import parse_prompt_line


def _params():
    return [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 0.1}]


@pytest.mark.parametrize("name, cls", [("AdamW", "AdamW"), ("adamw", "AdamW"), ("SGDNesterov", "SGD"),
                                       ("Adafactor", "Adafactor"), ("torch.optim.RMSprop", "RMSprop"),
                                       ("AdamW8bit", "AdamW8bit"), ("Lion8bit", "Lion8bit")])
def test_optimizer_names(name, cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(name, _params(), 0.1, ["weight_decay=0.01"] if "Adafactor" not in name else None)
    assert type(opt).__name__ == cls
    if cls == "SGD":
        assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))


def test_optimizer_args_literal_eval_and_errors():
    opt = make_optimizer("AdamW", _params(), 0.1, ["betas=(0.8,0.95)", "weight_decay=0.5"])
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["weight_decay"] == 0.5
    assert optimizer_description(opt, ["weight_decay=0.5"]) == "torch.optim.adamw.AdamW(weight_decay=0.5)"
    with pytest.raises(LoraxInputError, match="unknown"):
        make_optimizer("NoSuchOpt", _params(), 0.1, None)
    with pytest.raises(LoraxInputError, match="bad optimizer_args"):
        make_optimizer("AdamW", _params(), 0.1, ["nonsense=1"])
    with pytest.raises(LoraxInputError, match="not key=value"):
        make_optimizer("AdamW", _params(), 0.1, ["oops"])


def test_schedulers():
    def lrs(name, warm=0, total=10):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        sch = make_scheduler(name, opt, warm, total)
        out = []
        for _ in range(total):
            out.append(sch.get_last_lr()[0])
            opt.step()
            sch.step()
        return out

    assert lrs("constant") == [1.0] * 10
    assert lrs("constant_with_warmup", 2)[:3] == [0.0, 0.5, 1.0]
    lin = lrs("linear")
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5)
    assert lrs("cosine")[5] == pytest.approx(0.5)
    assert lrs("polynomial")[-1] < 0.2 and lrs("cosine_with_restarts")[0] == 1.0
    with pytest.raises(LoraxInputError, match="constant_with_warmup"):
        lrs("constant", 2)
    assert warmup_steps(0.1, 500) == 50 and warmup_steps(20, 500) == 20


def test_sample_prompt_options():
    p = parse_prompt_line("a red circle, glow --n blurry, dark --w 320 --h 448 --d 42 --l 6.5 --s 12", 512)
    assert (p.prompt, p.negative, p.width, p.height, p.seed, p.scale, p.steps) == \
        ("a red circle, glow", "blurry, dark", 320, 448, 42, 6.5, 12)
    assert parse_prompt_line("# note", 512) is None and parse_prompt_line("  ", 512) is None
    q = parse_prompt_line("plain", 64)
    assert (q.width, q.height, q.seed) == (64, 64, None)
    with pytest.raises(LoraxInputError, match="--w"):
        parse_prompt_line("x --w wide", 512)


def test_metadata_keys():
    args = {"pretrained_model_name_or_path": "/nowhere/model", "network_module": "networks.lora_x",
            "network_dim": 320, "network_alpha": 320.0, "output_name": "bf", "v_parameterization": False,
            "network_args": ["conv_dim=4"], "learning_rate": 1e-3}
    md = base_metadata(args, "sd1", {"seed": 3, "network_kwargs": {"conv_dim": "4", "dropout": None}})
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_dim"] == "320" and md["ss_v2"] == "False" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_network_args"] == '{"conv_dim": "4", "dropout": null}'
    spec = modelspec(args, "sdxl", (1024, 1024))
    assert spec["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert spec["modelspec.resolution"] == "1024x1024" and spec["modelspec.title"] == "bf"
    saved = at_save(md, spec, step=7, epoch=2)
    assert saved["ss_steps"] == "7" and saved["ss_epoch"] == "2" and "ss_training_finished_at" in saved
    minimal = base_metadata(dict(args, no_metadata=True), "sd2", {})
    assert set(minimal) == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                            "ss_network_alpha", "ss_network_args"}


def test_metadata_model_hashes_match_the_checkpoint_file(tiny_sd1_single):
    import hashlib

    data = open(tiny_sd1_single, "rb").read()
    md = base_metadata({"pretrained_model_name_or_path": str(tiny_sd1_single), "network_module": "networks.lora_x"},
                       "sd1", {})
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert md["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert "ss_sd_model_hash" not in base_metadata({"pretrained_model_name_or_path": "/nowhere/model"}, "sd1", {})
