"""`--method distill`: the projection refined by data-free function matching (see `run`)."""

from .run import DistillOptions, DistillReport, distill_transfer

__all__ = ["DistillOptions", "DistillReport", "distill_transfer"]
