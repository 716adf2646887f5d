"""`--method distill`: the projection refined by data-free function matching.

options (DistillOptions, no torch), prompts (from ss_tag_frequency or a file), models (loading,
the teacher's merge), teacher (synthetic sets and their cache), adapter (the trained LoRA-X modules
as hooks), fit (the objective and the optimiser), run (distill_transfer: the whole method).
"""
