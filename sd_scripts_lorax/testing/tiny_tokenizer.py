"""A small CLIP BPE tokenizer built offline, for tiny models.

Real CLIP vocabularies cannot be downloaded here, so tiny models get a vocabulary of their own in
the exact CLIP file format (`vocab.json` + `merges.txt`, loaded by transformers' `CLIPTokenizer`):
the 256 byte symbols CLIP uses (alone and with the `</w>` end-of-word mark), merges that make each
word of a word list a single token, and CLIP's two special tokens last.
"""

from __future__ import annotations

import json
from pathlib import Path

# Words the embedded demo, fixtures and tests use; anything else still tokenises, byte by byte.
DEFAULT_WORDS = (
    "a an the of on in with and photo picture painting drawing style render art "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle square triangle star ring cross diamond heart shape shapes stripe stripes dots "
    "small large big tiny two three background sky grass sea sand night day sunset "
    "fire flames glow glowing neon smoke ice water cat dog car house tree flower bird fish "
    "man woman person face portrait landscape city mountain sks ohwx lorax "
).split()


def _byte_symbols() -> list[str]:
    """CLIP's reversible byte -> printable-unicode table (the same table GPT-2 uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_vocab(words=DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    symbols = _byte_symbols()
    tokens = list(symbols) + [s + "</w>" for s in symbols]
    merges: list[str] = []
    seen = set(tokens)
    for word in dict.fromkeys(w.lower() for w in words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right so the whole word ends as one token
            a, b = parts[0], parts[1]
            merged = a + b
            if merged not in seen:
                merges.append(f"{a} {b}")
                tokens.append(merged)
                seen.add(merged)
            parts = [merged] + parts[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: str | Path, words=DEFAULT_WORDS, max_length: int = 77) -> Path:
    """Write a CLIPTokenizer-loadable folder; returns it. Deterministic for a given word list."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2), encoding="utf-8")
    return folder


def vocab_size(words=DEFAULT_WORDS) -> int:
    return len(build_vocab(words)[0])
