"""The transfer report: per-module results, a terminal table, JSON and a similarity heat map.

No math and no checkpoint reading here: the pipeline (`transfer.py`) fills `ModuleResult`s and this
file only presents them. Every file written here is written atomically.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..formats.atomic import atomic_write

# Reasons a module ends up where it does; the first two mean "in the output".
TRANSFERRED = "transferred"
IDENTICAL = "identical"
BELOW_THRESHOLD = "below threshold"
FILTERED = "filtered"
MISSING_IN_TARGET = "missing in target"
SHAPE_MISMATCH = "shape mismatch"
REASONS = (TRANSFERRED, IDENTICAL, BELOW_THRESHOLD, FILTERED, MISSING_IN_TARGET, SHAPE_MISMATCH)


@dataclass
class ModuleResult:
    """What happened to one module of one input LoRA."""

    name: str                                  # kohya name in the output (the target's module)
    shape: tuple[int, ...]                     # the module weight's shape
    rank: int                                  # rank used for bases / output (0 when never computed)
    transferred: bool
    reason: str                                # one of REASONS
    phi_u: float | None = None
    phi_v: float | None = None
    source: str | None = None                  # the paired source module (differs with --match similarity)
    norm_source: float | None = None           # ||dW_s||_F of the input adapter
    norm_target: float | None = None           # ||dW_t||_F of the projected adapter
    energy_in_source_subspace: float | None = None  # ||P_s dW_s|| / ||dW_s||, plain LoRA input only

    @property
    def phi(self) -> float | None:
        """Module score: min(phi_U, phi_V)."""
        if self.phi_u is None or self.phi_v is None:
            return None
        return min(self.phi_u, self.phi_v)

    @property
    def energy_kept(self) -> float | None:
        """||dW_t|| / ||dW_s||: how much of the adapter survives the projection."""
        if self.norm_source is None or self.norm_target is None:
            return None
        if self.norm_source == 0.0:
            return 1.0
        return self.norm_target / self.norm_source

    def to_json(self, plain_input: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "rank": self.rank,
            "phi_u": self.phi_u,
            "phi_v": self.phi_v,
            "phi": self.phi,
            "transferred": self.transferred,
            "reason": self.reason,
            "energy_kept": self.energy_kept,
        }
        if self.source is not None and self.source != self.name:
            out["source"] = self.source
        if plain_input:
            out["energy_in_source_subspace"] = self.energy_in_source_subspace
        return out


@dataclass
class TransferReport:
    """Everything about one input LoRA's transfer."""

    lora: str
    source_model: str
    target_model: str
    threshold: float
    match: str
    is_lorax: bool
    output: str | None = None
    source_hash: str | None = None
    target_hash: str | None = None
    modules: list[ModuleResult] = field(default_factory=list)

    @property
    def kept(self) -> list[ModuleResult]:
        return [m for m in self.modules if m.transferred]

    @property
    def dropped(self) -> list[ModuleResult]:
        return [m for m in self.modules if not m.transferred]

    def summary(self) -> dict[str, Any]:
        """Totals: counts, mean phi, energy kept over the whole adapter."""
        phis = [m.phi for m in self.modules if m.phi is not None]
        src_sq = sum(m.norm_source ** 2 for m in self.modules if m.norm_source is not None)
        kept_sq = sum(m.norm_target ** 2 for m in self.kept if m.norm_target is not None)
        reasons = {r: sum(1 for m in self.modules if m.reason == r) for r in REASONS}
        out: dict[str, Any] = {
            "lora": self.lora,
            "output": self.output,
            "source_model": self.source_model,
            "target_model": self.target_model,
            "source_hash": self.source_hash,
            "target_hash": self.target_hash,
            "threshold": self.threshold,
            "match": self.match,
            "input_is_lorax": self.is_lorax,
            "modules": len(self.modules),
            "kept": len(self.kept),
            "dropped": len(self.dropped),
            "reasons": {r: n for r, n in reasons.items() if n},
            "mean_phi": (sum(phis) / len(phis)) if phis else None,
            # share of the input's total Frobenius energy present in the output (dropped modules count as 0)
            "energy_kept": math.sqrt(kept_sq / src_sq) if src_sq > 0 else None,
        }
        if not self.is_lorax:
            shares = [(m.norm_source, m.energy_in_source_subspace) for m in self.modules
                      if m.norm_source is not None and m.energy_in_source_subspace is not None]
            tot = sum(n ** 2 for n, _ in shares)
            out["energy_in_source_subspace"] = (
                math.sqrt(sum((n * e) ** 2 for n, e in shares) / tot) if tot > 0 else None)
        return out

    def to_json(self) -> dict[str, Any]:
        """The report as {"modules": [...], "summary": {...}}."""
        plain = not self.is_lorax
        return {"modules": [m.to_json(plain) for m in self.modules], "summary": self.summary()}


# ---------------------------------------------------------------- terminal table


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(report: TransferReport) -> str:
    """A fixed-width table, one row per module, ending with the totals."""
    plain = not report.is_lorax
    head = ["module", "shape", "phi_U", "phi_V", "status", "energy"]
    if plain:
        head.append("in_src")
    rows = []
    for m in report.modules:
        status = ("kept" if m.transferred else "dropped") + (
            f" ({m.reason})" if m.reason != TRANSFERRED else "")
        row = [m.name, "x".join(str(s) for s in m.shape) or "-", _fmt(m.phi_u), _fmt(m.phi_v),
               status, _fmt(m.energy_kept)]
        if plain:
            row.append(_fmt(m.energy_in_source_subspace))
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 1, 4) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    s = report.summary()
    out = [f"{report.lora}: {report.source_model} -> {report.target_model} "
           f"(threshold {report.threshold}, match {report.match})", line(head),
           line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append(line(["-" * w for w in widths]))
    reasons = ", ".join(f"{n} {r}" for r, n in s["reasons"].items() if r != TRANSFERRED)
    total = (f"total: {s['kept']} kept, {s['dropped']} dropped"
             + (f" ({reasons})" if reasons else "")
             + f"; mean phi {_fmt(s['mean_phi'])}; energy kept {_fmt(s['energy_kept'])}")
    if plain:
        total += f"; energy in source subspace {_fmt(s.get('energy_in_source_subspace'))}"
    out.append(total)
    if plain:
        out.append("note: the input is a plain LoRA, not LoRA-X: only its part inside the source "
                   "subspace (column in_src) can transfer faithfully")
    return "\n".join(out)


# ---------------------------------------------------------------- JSON


def write_json(reports: Sequence[TransferReport], path: str | Path) -> Path:
    """Write one report as {"modules", "summary"}; several as {"reports": [...]} of the same form."""
    if len(reports) == 1:
        doc: dict[str, Any] = reports[0].to_json()
    else:
        doc = {"reports": [r.to_json() for r in reports]}
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


# ---------------------------------------------------------------- heat map

# Module leaves that contain digits and so cannot be split generically at the last "_<n>_".
_KNOWN_LEAVES = re.compile(
    r"(attn\d_to_(?:q|k|v|out_0)|ff_net_0_proj|ff_net_2|self_attn_(?:q|k|v|out)_proj|mlp_fc\d)$")
_GENERIC = re.compile(r"^(.*_\d+)_([a-z].*)$")


def split_block(name: str) -> tuple[str, str]:
    """Split a kohya name into (block, leaf): ("unet_..._transformer_blocks_0", "attn1_to_q")."""
    short = name[len("lora_"):] if name.startswith("lora_") else name
    m = _KNOWN_LEAVES.search(short)
    if m and m.start() > 0 and short[m.start() - 1] == "_":
        return short[: m.start() - 1], m.group(1)
    g = _GENERIC.match(short)
    if g:
        return g.group(1), g.group(2)
    head, _, tail = short.rpartition("_")
    return (head or short), (tail if head else "")


def heatmap_grid(modules: Iterable[ModuleResult]) -> tuple[list[str], list[str], list[list[float]]]:
    """(block rows, leaf columns, phi values with NaN where a block has no such module)."""
    cells: dict[tuple[str, str], float] = {}
    blocks: list[str] = []
    leaves: list[str] = []
    for m in modules:
        if m.phi is None:
            continue
        b, leaf = split_block(m.name)
        if b not in blocks:
            blocks.append(b)
        if leaf not in leaves:
            leaves.append(leaf)
        cells[(b, leaf)] = m.phi
    grid = [[cells.get((b, leaf), math.nan) for leaf in leaves] for b in blocks]
    return blocks, leaves, grid


def plot_heatmap(report: TransferReport, path: str | Path) -> Path:
    """Per-block similarity heat map (rows: blocks, columns: module kinds, colour: phi)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here; must precede pyplot
    import matplotlib.pyplot as plt
    import numpy as np

    blocks, leaves, grid = heatmap_grid(report.modules)
    data = np.ma.masked_invalid(np.array(grid, dtype=float).reshape(len(blocks), len(leaves)))
    fig_h = max(2.5, 0.22 * len(blocks) + 1.8)
    fig_w = max(5.0, 0.45 * len(leaves) + 0.09 * max((len(b) for b in blocks), default=10) + 2.0)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    try:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: no such module
        im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(leaves)), leaves, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=6)
        # mark the threshold so dropped cells stand out
        for i in range(len(blocks)):
            for j in range(len(leaves)):
                v = grid[i][j]
                if not math.isnan(v) and v < report.threshold:
                    ax.text(j, i, "x", ha="center", va="center", color="red", fontsize=6)
        fig.colorbar(im, ax=ax, label="phi = min(phi_U, phi_V)")
        ax.set_title(f"{report.source_model} -> {report.target_model} "
                     f"(x: phi < {report.threshold})", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # long block names
    finally:
        plt.close(fig)
    return path
