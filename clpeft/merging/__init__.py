"""Model merging: task arithmetic, TIES, DARE, mean and AdaMerging, LoRA-aware and streaming.

Two entry points share one engine:

* :func:`merge` combines in-memory state dicts (or LoRA adapters);
* :func:`merge_files` streams safetensors checkpoints tensor by tensor into a new
  safetensors file plus a JSON report, in bounded memory, on the CPU or a GPU.

:func:`adamerging` also returns the coefficients it learned. Methods are plain functions
registered with :func:`merge_method`; :func:`list_methods` lists them with their papers.
"""

from clpeft.merging.api import merge, merge_files
from clpeft.merging.lora import LoraAdapter
from clpeft.merging.methods.adamerging import AdaMergingResult, adamerging, functional_forward
from clpeft.merging.registry import MergeMethod, get_method, list_methods, merge_method
from clpeft.merging.report import MergeReport, TensorReport
from clpeft.merging.rules import MergeRules

__all__ = [
    "AdaMergingResult",
    "LoraAdapter",
    "MergeMethod",
    "MergeReport",
    "MergeRules",
    "TensorReport",
    "adamerging",
    "functional_forward",
    "get_method",
    "list_methods",
    "merge",
    "merge_files",
    "merge_method",
]
