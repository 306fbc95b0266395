"""LoRA adapters alone as safetensors: one ``<module>.lora_A``, ``<module>.lora_B`` and
``<module>.lora_alpha`` per layer, the format :mod:`clpeft.merging.lora` reads.

Frozen past updates are folded into those factors (:meth:`LoRALinear.combined_factors`), so a
file always holds a layer's whole update. Every adapter kind is stored this way (VeRA's and
LoRA-XS's updates as their equivalent LoRA factors); DoRA adds ``<module>.lora_magnitude_vector``.

:func:`save_peft_adapter` writes the same update as a peft adapter directory
(``adapter_model.safetensors`` and ``adapter_config.json``) that
``peft.PeftModel.from_pretrained(base_model, directory)`` loads onto the original base model with
the same outputs: a LoRA adapter (per-layer ``rank_pattern``/``alpha_pattern``), with
``use_dora`` for DoRA layers, or peft's VeRA adapter for VeRA layers without frozen updates.
:func:`single_adapters` gives one adapter of a multi-adapter model's layers to save that way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clpeft.components.lora.batched import MultiLoRALinear
from clpeft.components.lora.dora import DoRALinear
from clpeft.components.lora.injection import lora_layers
from clpeft.components.lora.layer import LoRALinear
from clpeft.components.lora.vera import VeRALinear
from clpeft.errors import UserError

_FORMAT = "clpeft.lora"


def save_adapters(model: nn.Module, path: str | Path) -> None:
    """Save every LoRA layer's ``A``, ``B`` and ``alpha`` (not the base model) as safetensors.

    A layer with frozen past updates is saved as one update equal to all of them together
    (:meth:`LoRALinear.combined_factors`).

    Keys are ``<module>.lora_A``, ``<module>.lora_B`` and ``<module>.lora_alpha`` (a float64
    scalar), plus ``<module>.lora_magnitude_vector`` for DoRA layers; the metadata holds
    ``format`` and a JSON ``layers`` map of module to ``{"rank", "alpha"}`` for readers
    that do not load tensors.
    """
    layers = _layers(model)
    tensors, summary = {}, {}
    for name, layer in layers.items():
        stored = layer.adapter_tensors()
        for suffix, t in stored.items():
            tensors[f"{name}.{suffix}"] = t.cpu().contiguous()
        summary[name] = {"rank": stored["lora_A"].shape[0], "alpha": stored["lora_alpha"].item()}
    save_file(tensors, str(path), metadata={"format": _FORMAT, "layers": json.dumps(summary)})


def _layers(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no LoRA layers to save")
    return layers


def save_peft_adapter(model: nn.Module, directory: str | Path, layers: Mapping[str, LoRALinear] | None = None) -> None:
    """Save the LoRA layers of ``model`` as a peft adapter directory (see the module docs).

    Layers of one kind only: DoRA layers cannot be mixed with others (peft's ``use_dora`` is
    per adapter). Module paths are the ``target_modules`` (peft matches them on the plain model).
    ``layers`` (by module path) replaces ``model``'s own, e.g. one adapter of its multi-adapter
    layers (:func:`single_adapters`).
    """
    layers = _layers(model) if layers is None else layers
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dora = [isinstance(layer, DoRALinear) for layer in layers.values()]
    if any(dora) and not all(dora):
        raise UserError("a peft adapter is DoRA for all of its layers or for none; save DoRA and other layers separately")
    if all(isinstance(layer, VeRALinear) and not layer.frozen_rank for layer in layers.values()):
        tensors, config = _peft_vera(layers)
    else:
        tensors, config = {}, _peft_lora_config(layers, use_dora=all(dora))
        for name, layer in layers.items():
            for suffix, t in layer.adapter_tensors().items():
                if suffix != "lora_alpha":
                    key = f"{_PEFT_PREFIX}{name}.{suffix}" + (".weight" if suffix in ("lora_A", "lora_B") else "")
                    tensors[key] = t.cpu().contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


_PEFT_PREFIX = "base_model.model."


@torch.no_grad()
def single_adapters(layers: Mapping[str, MultiLoRALinear], k: int) -> dict[str, LoRALinear]:
    """Adapter ``k`` of each layer as a :class:`LoRALinear` on the layer's own base layer (shared, not copied).

    Each holds a copy of ``A_k``, ``B_k`` with ``alpha = scaling[k] r``, so its update is adapter
    ``k``'s, ``scaling[k] B_k A_k``. Building them leaves the random generators as they were (the
    fresh layers' own draw of ``A`` is replaced at once), so a run that saves them trains as one
    that does not.
    """
    device = next(iter(layers.values())).lora_A.device
    singles = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for name, layer in layers.items():
            alpha = layer.scaling[k].item() * layer.lora_A.shape[1]
            single = LoRALinear(layer.base_layer, layer.lora_A.shape[1], alpha)
            single.load_factors(layer.lora_A[k].clone(), layer.lora_B[k].clone(), alpha)
            singles[name] = single
    return singles


def _peft_lora_config(layers: dict[str, LoRALinear], use_dora: bool) -> dict:
    ranks, alphas = {}, {}
    for name, layer in layers.items():
        a, _, alpha = LoRALinear.combined_factors(layer)  # DoRA's low-rank part, as peft stores it
        ranks[re.escape(name)], alphas[re.escape(name)] = a.shape[0], alpha
    first = next(iter(ranks))
    return {
        "peft_type": "LORA",
        "r": ranks[first],
        "lora_alpha": alphas[first],
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "target_modules": list(layers),
        "use_dora": use_dora,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
    }


def _peft_vera(layers: dict[str, LoRALinear]) -> tuple[dict[str, torch.Tensor], dict]:
    """peft's VeRA adapter: the shared projections rebuilt from the layers' slices, and the vectors."""
    first = next(iter(layers.values()))
    shared_a = first.lora_A.new_zeros(first.rank, max(layer.lora_A.shape[1] for layer in layers.values()))
    shared_b = first.lora_B.new_zeros(max(layer.lora_B.shape[0] for layer in layers.values()), first.rank)
    tensors = {}
    for name, layer in layers.items():
        shared_a[:, : layer.lora_A.shape[1]] = layer.lora_A
        shared_b[: layer.lora_B.shape[0]] = layer.lora_B
        tensors[f"{_PEFT_PREFIX}{name}.vera_lambda_b"] = layer.lora_lambda_b.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.vera_lambda_d"] = layer.lora_lambda_d.detach().cpu().contiguous()
    tensors["base_model.vera_A"] = shared_a.cpu().contiguous()
    tensors["base_model.vera_B"] = shared_b.cpu().contiguous()
    config = {
        "peft_type": "VERA",
        "r": first.rank,
        "target_modules": list(layers),
        "save_projection": True,
        "d_initial": first.d_initial,
        "vera_dropout": 0.0,
        "bias": "none",
    }
    return tensors, config


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
        keys = set(f.keys())
        for name, layer in layers.items():
            prefix = f"{name}."
            layer.load_adapter_tensors({k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)})
    return layers
