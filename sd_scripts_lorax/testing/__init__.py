"""Test and demo material made here: random-weight checkpoints (tiny and full size), an offline
CLIP tokenizer, and the embedded demo model pair."""
