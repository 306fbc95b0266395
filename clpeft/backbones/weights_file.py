"""Strict loading of a ``backbone.weights`` file: every tensor used, every parameter filled.

Two kinds of file are accepted:

* **clpeft's own**: a run directory, its ``model.safetensors``, or a ``clpeft merge`` output
  of such files. Their names are the strategy's (:func:`clpeft.engine.export_weights`:
  ``backbone.net.blocks.0.mlp.fc1.weight``, ``head.weight``, ...), so a file is taken as one
  when a name starts with ``backbone.``: the tensors under that prefix are kept without it,
  every other tensor (heads, prompts, teachers) is left out, and what is kept must fit the
  backbone module exactly.
* **any other state dict**: the backbone's network under its own names (for ``timm``, timm's
  names). As timm does, a training checkpoint's ``state_dict_ema``, ``model_ema``,
  ``state_dict`` or ``model`` entry (the first present) is taken, and the ``module.`` and
  ``_orig_mod.`` prefixes of DDP and ``torch.compile`` are dropped.

``.safetensors`` files are read with safetensors, anything else with
``torch.load(weights_only=True)``, so a file never runs code. A file that leaves a parameter
or persistent buffer unfilled, holds a tensor that fills none, disagrees in a shape, or is no
checkpoint at all is a one-line :class:`~clpeft.errors.UserError` naming the file.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from clpeft.errors import UserError

KEY = "backbone.weights"
RUN_FILE = "model.safetensors"  # what a run directory holds once the run has ended
RUN_PREFIX = "backbone."  # the strategy's name for its backbone module
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DDP: dropped wherever they nest
_SHOWN = 3
RUN_FIX = "give a run or merge output made with this backbone and the same settings"
OTHER_FIX = "give this backbone's own state dict, a clpeft run directory, its model.safetensors or a clpeft merge output"


def _reason(exc: Exception) -> str:
    """The reader's complaint in a few words: its type and first sentence (torch's unpickling advice left out)."""
    text = str(exc).strip()
    if not text or isinstance(exc, pickle.UnpicklingError):
        return type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0].split('. ')[0][:160]}"


def _load(file: Path):
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # text, truncated or foreign files: whatever the reader raised
        named = re.search(r"GLOBAL (\S+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if named:
            raise UserError(f"{file} asks to load '{named[1]}'; clpeft never runs code from a weights file", key=KEY) from None
        raise UserError(
            f"{file} is not a readable checkpoint ({_reason(exc)}); give a .safetensors file or a torch.save'd state dict", key=KEY
        ) from None


def _unwrap(payload, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(payload, dict):
        payload = next((payload[k] for k in _WRAPPERS if isinstance(payload.get(k), dict)), payload)
    if not isinstance(payload, dict):
        raise UserError(f"{file} holds a {type(payload).__name__}, not a state dict (names -> tensors)", key=KEY)
    if not payload:
        raise UserError(f"{file} holds no tensors", key=KEY)
    tensors = {}
    for name, value in payload.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{file} is not a state dict: {name!r} holds a {type(value).__name__}, not a tensor", key=KEY)
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        tensors[name] = value
    return tensors


def read(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], bool]:
    """The tensors of a weights file or run directory.

    Returns:
        ``(file, tensors, from_run)``: the file read; its tensors; and whether it is clpeft's
        own (then only the backbone's tensors are returned, without ``backbone.``).

    Raises:
        UserError: no such file, a run directory without ``model.safetensors``, or a file
            that is not a state dict.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / RUN_FILE
        if not file.is_file():
            raise UserError(f"{file.parent} holds no {RUN_FILE}: give a finished clpeft run directory or a checkpoint file", key=KEY)
    elif not file.is_file():
        raise UserError(f"{file} not found", key=KEY)
    tensors = _unwrap(_load(file), file)
    if any(name.startswith(RUN_PREFIX) for name in tensors):
        return file, {k[len(RUN_PREFIX) :]: v for k, v in tensors.items() if k.startswith(RUN_PREFIX)}, True
    return file, tensors, False


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def first_names(names: list[str]) -> str:
    """The first few names, comma-separated, and how many more."""
    more = f", ... {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _prefix_hint(missing: list[str], unexpected: list[str], shown: str) -> str:
    """Name a prefix the file's names carry (or lack) when that alone explains the mismatch."""
    u = unexpected[0]
    for m in missing:
        if u.endswith("." + m):
            return f"; its names carry an extra prefix '{shown}{u[: -len(m)]}'"
        if m.endswith("." + u):
            return f"; its names lack the prefix '{shown}{m[: -len(u)]}'"
    return ""


def _adapter_hint(unexpected: list[str]) -> str:
    """Say so when the unused tensors are LoRA's (clpeft's ``lora_`` prefix, peft's ``base_layer``)."""
    parts = {part for name in unexpected for part in name.split(".")}
    if "base_layer" in parts or any(part.startswith("lora_") for part in parts):
        return "; its LoRA tensors (lora_*, base_layer) need the strategy that made them: fold them into the weights first"
    return ""


def load_strict(
    module: nn.Module, tensors: dict[str, torch.Tensor], file: Path, *, shown: str = "", ignore: Iterable[str] = (), fix: str = ""
) -> None:
    """Fill every parameter and persistent buffer of ``module`` from ``tensors``, or refuse.

    Args:
        module: the module the names are relative to.
        tensors: its state dict as read from ``file``.
        file: named in errors.
        shown: prefix put before names in errors, so they read as in the file.
        ignore: module paths left out on both sides, e.g. a timm checkpoint's classifier that
            the headless backbone does not have.
        fix: what the user can do, appended to errors.

    Raises:
        UserError: a shape disagrees, or a name is missing on either side (one line: the file,
            the counts, the first names and ``fix``).
    """
    ignore = tuple(ignore)
    tensors = {k: v for k, v in tensors.items() if not _under(k, ignore)}
    expected = {k: v for k, v in module.state_dict().items() if not _under(k, ignore)}
    fix = f"; {fix}" if fix else ""
    for name, value in tensors.items():
        if name in expected and value.shape != expected[name].shape:
            raise UserError(
                f"{file}: '{shown}{name}' has shape {tuple(value.shape)} in the file but "
                f"{tuple(expected[name].shape)} in the backbone{fix}",
                key=KEY,
            )
    result = module.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not _under(k, ignore)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} of the backbone's {len(expected)} tensors are not in it ({first_names([shown + k for k in missing])})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} of its {len(tensors)} tensors belong to no backbone tensor "
                f"({first_names([shown + k for k in unexpected])})"
            )
        hint = (_prefix_hint(missing, unexpected, shown) if missing and unexpected else "") + _adapter_hint(unexpected)
        raise UserError(f"{file} does not fit the backbone: {'; '.join(parts)}{hint}{fix}", key=KEY)


def load(backbone: nn.Module, path: str | Path) -> None:
    """Load a weights file or run directory into ``backbone`` strictly (see the module docstring).

    A file that is not clpeft's own must hold ``backbone``'s own state dict.
    """
    file, tensors, from_run = read(path)
    if from_run:
        load_strict(backbone, tensors, file, shown=RUN_PREFIX, fix=RUN_FIX)
    else:
        load_strict(backbone, tensors, file, fix=OTHER_FIX)
