"""Built-in merge methods; importing this package registers them (one module per method)."""

from clpeft.merging.methods import (
    adamerging,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    mean,
    model_stock,
    multislerp,
    nuslerp,
    sce,
    slerp,
    task_arithmetic,
    ties,
)

__all__ = [
    "adamerging",
    "breadcrumbs",
    "dare",
    "della",
    "karcher",
    "linear",
    "mean",
    "model_stock",
    "multislerp",
    "nuslerp",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
]
