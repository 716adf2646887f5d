"""The embedded demo: a tiny SD1-layout SOURCE model, its fine-tuned TARGET, and a style dataset.

Real SD weights cannot be downloaded here, so `make demo` runs on this pair, committed under
`assets/embedded/` and rebuilt with `python -m sd_scripts_lorax.testing.embedded.build --out assets/embedded`.

- `embedded_model_path("source" | "target")`: the committed diffusers folders.
- `write_style_dataset(folder, seed, split="train" | "eval")`, `eval_prompts()`: the "blue fire"
  style data for LoRA training and evaluation (generated at run time).
- `rebuild(out, seed)`: retrain the pair (about 10 minutes on one CPU core).
"""

from __future__ import annotations

from pathlib import Path

from .concepts import Scene, sample_scene
from .paths import embedded_model_path
from .render import render_scene
from .style_data import eval_prompts, write_style_dataset


def rebuild(out: str | Path, seed: int = 0, overwrite: bool = False, **kwargs) -> dict:
    """Retrain the SOURCE/TARGET pair into `out/source`, `out/target`; returns the build report.

    Imported lazily: the generator and loaders need neither torch training code nor diffusers.
    """
    from .build import build

    return build(out, seed=seed, overwrite=overwrite, **kwargs)


__all__ = ["Scene", "sample_scene", "render_scene", "embedded_model_path", "write_style_dataset",
           "eval_prompts", "rebuild"]
