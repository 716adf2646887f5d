"""Where the committed embedded models live."""

from __future__ import annotations

from pathlib import Path

from ...errors import LoraxInputError

ROLES = ("source", "target")
# assets/ sits at the repository root, next to the sd_scripts_lorax package
ASSETS_DIR = Path(__file__).resolve().parents[3] / "assets" / "embedded"


def embedded_model_path(role: str = "source") -> Path:
    """The diffusers folder of the embedded SOURCE or TARGET model (`assets/embedded/<role>`)."""
    if role not in ROLES:
        raise LoraxInputError(f"embedded model {role!r}: expected one of {ROLES}")
    path = ASSETS_DIR / role
    if not (path / "model_index.json").is_file():
        raise LoraxInputError(
            f"{path}: embedded {role} model missing; rebuild with "
            "`python -m sd_scripts_lorax.testing.embedded.build --out assets/embedded`")
    return path
