"""Checks run inside kohya's own venv, from a kohya sd-scripts copy (the current folder), on kohya's
own model classes; each writes one JSON object.

  python -m sd_scripts_lorax.testing.kohya.probes keys sd1|sdxl CONV_DIM|none --json OUT
      the LoRA key -> shape map of kohya's networks/lora.py and of networks.lora_x on kohya's UNet
      class and transformers' CLIP text encoders (built on the meta device: names and shapes only);
  python -m sd_scripts_lorax.testing.kohya.probes merge CHECKPOINT LORA --json OUT
      the weight change kohya's own networks/lora.py merges from LORA (create_network_from_weights
      + merge_to: the path of kohya's merge and inference tools) against the change networks.lora_x
      merges from its own d (create_network_from_weights + load_weights + merge_to), module by module:
      `max_err_over_tol` <= 1 when they agree to float32 rounding of W + dW and 1e-4 of dW.

Only kohya's venv (its pinned transformers etc.) and the core install of this project are imported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

sys.path.insert(0, ".")  # the kohya checkout: its `library` and `networks`

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def kohya_models(family: str):
    """(text encoder argument as kohya's trainer passes it, unet) for kohya's SD1.5 or SDXL classes."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    if family == "sd1":
        from library.original_unet import UNet2DConditionModel
        return CLIPTextModel(CLIPTextConfig(**CLIP_L)), UNet2DConditionModel(64, 8, 768, False, False)
    from library.sdxl_original_unet import SdxlUNet2DConditionModel
    tes = [CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))]
    return tes, SdxlUNet2DConditionModel()


def keys(family: str, conv: str, dim: int = 4) -> dict:
    from networks import lora

    from sd_scripts_lorax.network.targets import find_targets
    conv_dim = None if conv == "none" else int(conv)
    with torch.device("meta"):
        te, unet = kohya_models(family)
        kwargs = {} if conv_dim is None else {"conv_dim": str(conv_dim), "conv_alpha": "1"}
        net = lora.create_network(1.0, dim, 1.0, None, te, unet, **kwargs)
        net.apply_to(te, unet, True, True)
        kohya_keys = {k: list(v.shape) for k, v in net.state_dict().items()}
    ours = {}
    for t in find_targets(te, unet, dim, conv_dim):  # the names and shapes save_weights writes
        w = t.base.weight
        r = min(t.rank, w.shape[0], math.prod(w.shape[1:]))
        ours[f"{t.lora_name}.lora_down.weight"] = [r, *w.shape[1:]]
        ours[f"{t.lora_name}.lora_up.weight"] = [w.shape[0], r] + ([1, 1] if w.dim() == 4 else [])
        ours[f"{t.lora_name}.alpha"] = []
    return {"unet_class": type(unet).__name__, "kohya": kohya_keys, "ours": ours}


def _layers(network) -> dict:
    return {m.lora_name: m.base for m in network.all_loras()}


@torch.no_grad()
def merge(checkpoint: str, lora_file: str, chunk: int = 24) -> dict:
    from library import model_util
    from networks import lora, lora_x  # kohya's own module and ours, side by side in kohya's networks/
    from safetensors.torch import load_file
    te, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(False, checkpoint)
    weights_sd = load_file(lora_file)
    ours, _ = lora_x.create_network_from_weights(1.0, lora_file, vae, te, unet)
    info = ours.load_weights(lora_file)
    layers = _layers(ours)
    names = sorted(layers)
    worst, worst_name, count, kinds, rel = 0.0, None, 0, {}, 0.0
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        part_sd = {k: v for k, v in weights_sd.items() if k.split(".")[0] in part}
        before = {n: layers[n].weight.detach().clone() for n in part}
        kohya_net, _ = lora.create_network_from_weights(1.0, None, vae, te, unet, weights_sd=part_sd,
                                                        for_inference=True)
        kohya_net.merge_to(te, unet, part_sd, torch.float32, "cpu")
        kohya_delta = {n: layers[n].weight.detach() - before[n] for n in part}
        for n in part:
            layers[n].weight.copy_(before[n])
        mods = {m.lora_name: m for m in ours.all_loras()}
        for n in part:
            mods[n].merge_to()  # what LoraXNetwork.merge_to() does per module: W += m U diag(d) V^T
            ours_delta = layers[n].weight.detach() - before[n]
            layers[n].weight.copy_(before[n])
            scale = float(kohya_delta[n].abs().max())
            diff = float((ours_delta - kohya_delta[n]).abs().max())
            # Both merges add a small update to float32 weights: they can only agree to the rounding of
            # W + dW (a few ulps of |W|), plus 1e-4 of the update for the two ways of forming it. A
            # module with d = 0 (no gradient, e.g. one-token attention at 64 px) must stay unchanged.
            tol = 1e-4 * scale + 4 * torch.finfo(torch.float32).eps * float(before[n].abs().max())
            err = diff / tol if scale > 0 else (0.0 if diff == 0 else math.inf)
            rel = max(rel, diff / scale) if scale > 0 else rel
            nd = layers[n].weight.dim()
            kinds[nd] = kinds.get(nd, 0) + 1
            count += 1
            if err > worst or worst_name is None:
                worst, worst_name = err, n
        del before, kohya_delta, kohya_net
    return {"modules": count, "file_modules": len({k.split(".")[0] for k in weights_sd}),
            "max_err_over_tol": worst, "worst_module": worst_name, "max_rel_err": rel,
            "dims": {str(k): v for k, v in kinds.items()},
            "load_info": {k: v for k, v in info.items() if k in ("loaded", "lorax", "energy_kept", "missing")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_scripts_lorax.testing.kohya.probes")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keys")
    k.add_argument("family", choices=["sd1", "sdxl"])
    k.add_argument("conv_dim")
    m = sub.add_parser("merge")
    m.add_argument("checkpoint")
    m.add_argument("lora")
    for s in (k, m):
        s.add_argument("--json", required=True)
    args = p.parse_args(argv)
    result = keys(args.family, args.conv_dim) if args.cmd == "keys" else merge(args.checkpoint, args.lora)
    with open(args.json, "w") as fh:
        json.dump(result, fh)
    print(json.dumps({k: v for k, v in result.items() if k not in ("kohya", "ours")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
