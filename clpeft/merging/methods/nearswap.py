"""NearSwap: take the fine-tuned model's value where it is near the base's, keep the base's elsewhere.

Alchemonaut, QuartetAnemoi-70B-t0.0001 model card (2024),
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (the reference mergekit's
``nearswap`` cites; ``mergekit/merge_methods/nearswap.py``). Per entry, with ``a`` the base and
``b`` the fine-tuned model, ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` and
``theta = w b + (1 - w) a``: entries that differ by at most ``t`` are swapped to the fine-tuned
model, entries further apart move towards it by ``t / |a - b|`` (so by exactly ``t``), and the
model as a whole stays close to the base (``|a - b|`` is floored at 1e-6, as in mergekit). On the
task vector ``tau = b - a`` this is ``tau_m = w tau``. The card's models use ``t = 1e-4`` (about
0.8% of a 70B model's entries swapped whole), clpeft's default; mergekit has none.

Equal to mergekit's ``nearswap`` up to float rounding (tests/reference/test_mergekit_more.py);
bf16 inputs are merged in float32 and rounded once, as for every method.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.methods.one_model import single_task_vector
from clpeft.merging.registry import merge_method

Threshold = Annotated[float, Field(ge=0.0, description="t: entries this close to the base are swapped to the fine-tuned model")]

_MIN_DISTANCE = 1e-6  # mergekit's floor on |a - b|


@merge_method("nearswap", reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")
def nearswap(task_vectors: torch.Tensor, *, t: Threshold = 1e-4) -> torch.Tensor:
    """NearSwap: theta = w b + (1 - w) a with w = clamp(t / |a - b|, 0, 1) per entry (alchemonaut, 2024)."""
    tau = single_task_vector(
        task_vectors, "nearswap moves the base towards exactly one fine-tuned model, got {count}; merge them first or use ram"
    )
    weight = tau.abs().clamp_(min=_MIN_DISTANCE).reciprocal_().mul_(t).clamp_(max=1.0)
    return tau.mul_(weight)
