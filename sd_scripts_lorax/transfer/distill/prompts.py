"""Prompts for a data-free distillation, from a LoRA file's `ss_tag_frequency` or a prompt file.

kohya records, per image folder, how often each comma-separated caption tag occurred. Tags that
occur in more than half of a folder's captions are that folder's trigger (e.g. "bluefire style");
the others are content ("a red circle on a sky background"). Two prompt sets come out of it:

- adapter prompts: trigger + one content tag, the captions the adapter was trained on (where the
  teacher's behaviour is what the user wants on the target);
- identity prompts: the content tags alone, without the trigger. Off the adapter's prompts the
  target should keep behaving like the target (a fine-tune's own look), not like the source.

A prompt file is read the same way: its lines are the adapter prompts, and the tags found in more
than half of them are taken as the trigger. No I/O beyond reading that one text file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ...errors import LoraxInputError

TRIGGER_SHARE = 0.5   # a tag in more than this share of a folder's captions is part of its trigger
MAX_PROMPTS = 64      # enough to cover a style's concepts; the teacher samples cycle through them


@dataclass(frozen=True)
class PromptSets:
    adapter: tuple[str, ...]    # where the target + adapter should behave like the source + adapter
    identity: tuple[str, ...]   # where the target + adapter should keep behaving like the target
    origin: str                 # "ss_tag_frequency" or the prompt file's path


def _split(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def _from_frequencies(folders: Mapping[str, Mapping[str, int]]) -> tuple[list[str], list[str]]:
    adapter: list[str] = []
    identity: list[str] = []
    for _, tags in sorted(folders.items()):
        counts = {str(k).strip(): int(v) for k, v in tags.items() if str(k).strip() and int(v) > 0}
        if not counts:
            continue
        top = max(counts.values())
        trigger = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c > TRIGGER_SHARE * top]
        content = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c <= TRIGGER_SHARE * top]
        head = ", ".join(trigger)
        adapter.append(head)
        adapter += [f"{head}, {c}" for c in content]
        identity += content
    return adapter, identity


def _dedupe(items: Sequence[str], limit: int) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for p in items:
        if p and p not in seen:
            seen[p] = None
    out = list(seen)
    if len(out) > limit:  # evenly spaced, so every folder and frequency band keeps some prompts
        out = [out[round(i * (len(out) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else out[:1]
    return tuple(out)


def from_metadata(metadata: Mapping[str, str], lora_path: str | Path) -> PromptSets | None:
    """The prompt sets of a LoRA's `ss_tag_frequency`; None when it has none (or an empty one)."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return None
    try:
        folders = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraxInputError(f"{lora_path}: ss_tag_frequency is not valid JSON; pass --prompts FILE") from None
    if not isinstance(folders, dict) or not all(isinstance(v, dict) for v in folders.values()):
        raise LoraxInputError(f"{lora_path}: ss_tag_frequency is not {{folder: {{tag: count}}}}; pass --prompts FILE")
    adapter, identity = _from_frequencies(folders)
    if not adapter:
        return None
    return PromptSets(_dedupe(adapter, MAX_PROMPTS), _dedupe(identity, MAX_PROMPTS), "ss_tag_frequency")


def from_lines(lines: Sequence[str], origin: str) -> PromptSets | None:
    """Prompt sets from user prompts (one per line; blank lines and '#' comments skipped)."""
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        return None
    counts = Counter(t for p in prompts for t in dict.fromkeys(_split(p)))
    trigger = {t for t, c in counts.items() if c > TRIGGER_SHARE * len(prompts)} if len(prompts) > 1 else set()
    identity = [", ".join(t for t in _split(p) if t not in trigger) for p in prompts]
    return PromptSets(_dedupe(prompts, MAX_PROMPTS), _dedupe(identity, MAX_PROMPTS), origin)


def resolve(metadata: Mapping[str, str], lora_path: str | Path, prompts_file: str | Path | None) -> PromptSets:
    """--prompts FILE when given, else the LoRA's tags; one clear line when there are neither."""
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise LoraxInputError(f"{path}: --prompts file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LoraxInputError(f"{path}: cannot read --prompts file ({exc})") from None
        sets = from_lines(text.splitlines(), str(path))
        if sets is None:
            raise LoraxInputError(f"{path}: --prompts file has no prompt (one prompt per line)")
        return sets
    sets = from_metadata(metadata, lora_path)
    if sets is None:
        raise LoraxInputError(f"{lora_path}: no ss_tag_frequency in its metadata to take prompts from; "
                              f"pass --prompts FILE (one prompt per line) for --method distill")
    return sets
