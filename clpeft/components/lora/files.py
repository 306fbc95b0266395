"""LoRA adapters alone as safetensors: one ``<module>.lora_A``, ``<module>.lora_B`` and
``<module>.lora_alpha`` per layer, the format :mod:`clpeft.merging.lora` reads.

Frozen past updates are folded into those factors (:meth:`LoRALinear.combined_factors`), so a
file always holds a layer's whole update.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clpeft.components.lora.injection import lora_layers
from clpeft.components.lora.layer import LoRALinear
from clpeft.errors import UserError

_FORMAT = "clpeft.lora"

def save_adapters(model: nn.Module, path: str | Path) -> None:
    """Save every LoRA layer's ``A``, ``B`` and ``alpha`` (not the base model) as safetensors.

    A layer with frozen past updates is saved as one update equal to all of them together
    (:meth:`LoRALinear.combined_factors`).

    Keys are ``<module>.lora_A``, ``<module>.lora_B`` and ``<module>.lora_alpha`` (a float64
    scalar); the metadata holds ``format`` and a JSON ``layers`` map of module to
    ``{"rank", "alpha"}`` for readers that do not load tensors.
    """
    layers = lora_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no LoRA layers to save")
    tensors, summary = {}, {}
    for name, layer in layers.items():
        a, b, alpha = layer.combined_factors()
        tensors[f"{name}.lora_A"] = a.cpu().contiguous()
        tensors[f"{name}.lora_B"] = b.cpu().contiguous()
        tensors[f"{name}.lora_alpha"] = torch.tensor(alpha, dtype=torch.float64)
        summary[name] = {"rank": a.shape[0], "alpha": alpha}
    save_file(tensors, str(path), metadata={"format": _FORMAT, "layers": json.dumps(summary)})


def load_adapters(model: nn.Module, path: str | Path) -> dict[str, LoRALinear]:
    """Load a :func:`save_adapters` file into the LoRA layers of ``model`` (after :func:`inject_lora`).

    Each layer takes the stored rank and alpha, whatever it had (the stored update replaces
    its frozen ones too). The file and the model must adapt the same modules.

    Returns:
        The model's LoRA layers by module path.
    """
    layers = lora_layers(model)
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("format") != _FORMAT:
            raise UserError(f"{path} is not a clpeft LoRA adapter file (no format={_FORMAT!r} metadata)")
        stored = {k[: -len(".lora_A")] for k in f.keys() if k.endswith(".lora_A")}
        if stored != set(layers):
            raise UserError(
                f"{path} does not fit the model: LoRA layers only in the file: {sorted(stored - set(layers))}, "
                f"only in the model: {sorted(set(layers) - stored)}"
            )
        for name, layer in layers.items():
            alpha = f.get_tensor(f"{name}.lora_alpha").item()
            layer.load_factors(f.get_tensor(f"{name}.lora_A"), f.get_tensor(f"{name}.lora_B"), alpha)
    return layers
