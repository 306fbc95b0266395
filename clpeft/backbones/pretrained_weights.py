"""State dicts without a backbone's unchanged pretrained weights.

A pretrained model's weights come from its config (``backbone.weights``), so a checkpoint need not
carry them: for a LoRA run on SmolLM2-135M they are 0.5 GB of every checkpoint, the adapters a few
megabytes. :class:`PretrainedWeights` records the SHA-256 digest of every parameter and buffer of a
module as loaded, and hooks the module's ``state_dict`` and ``load_state_dict``:

* **saving** leaves out every tensor whose bytes still equal its pretrained digest and records,
  under ``<prefix>omitted_pretrained_weights``, each left-out key's name in the pretrained model
  and its digest. Whatever training changed (LoRA factors, a merged or fully fine-tuned weight,
  a replaced parameter) stays in the state.
* **loading** puts the module's own tensor back for each left-out key after checking its digest.
  A tensor that changed since it was loaded (a LoRA merged into it) is read again from a freshly
  built pretrained model (``rebuild``); a digest that differs from this model's pretrained one
  means the state was saved with other pretrained weights: a one-line
  :class:`~clpeft.errors.UserError` naming the tensor.

Loading is therefore exact: every tensor the state left out comes back bit for bit, or the load
stops.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from clpeft.errors import UserError

OMITTED_KEY = "omitted_pretrained_weights"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    data = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{data.dtype} {tuple(data.shape)}".encode())
    if data.numel():
        h.update(data.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


class PretrainedWeights:
    """Leaves ``module``'s unchanged pretrained tensors out of its state dicts (see the module docstring).

    Args:
        module: the backbone, holding its pretrained weights and nothing else yet.
        rebuild: builds the pretrained module again (its tensors under the same names), for
            tensors that changed in this process since they were loaded.
        key: the config key named in errors.
    """

    def __init__(self, module: nn.Module, rebuild: Callable[[], nn.Module], key: str = "backbone.weights"):
        self._rebuild = rebuild
        self._key = key
        self._pretrained: dict[int, tuple[weakref.ref, str, str]] = {}  # id -> (tensor, pretrained name, digest)
        for name, tensor in _named_tensors(module):
            if id(tensor) not in self._pretrained:
                self._pretrained[id(tensor)] = (weakref.ref(tensor), name, tensor_digest(tensor))
        # torch marks each hook with an attribute, which a bound method cannot take: hand it partials
        module.register_state_dict_post_hook(partial(PretrainedWeights._omit, self))
        module.register_load_state_dict_pre_hook(partial(PretrainedWeights._restore, self))

    def _record(self, tensor: torch.Tensor) -> tuple[str, str] | None:
        """``(pretrained name, digest)`` when ``tensor`` is one of the pretrained tensors."""
        entry = self._pretrained.get(id(tensor))
        return entry[1:] if entry is not None and entry[0]() is tensor else None

    def _omit(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        omitted, unchanged = {}, {}
        for name, tensor in _named_tensors(module):
            record = self._record(tensor)
            if record is None or prefix + name not in state_dict:
                continue
            if id(tensor) not in unchanged:
                unchanged[id(tensor)] = tensor_digest(tensor) == record[1]
            if unchanged[id(tensor)]:
                del state_dict[prefix + name]
                omitted[name] = list(record)
        state_dict[prefix + OMITTED_KEY] = omitted

    def _restore(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        omitted = state_dict.pop(prefix + OMITTED_KEY, None) or {}
        current = dict(_named_tensors(module))
        changed = {}
        for name, (pretrained_name, digest) in omitted.items():
            tensor = current.get(name)
            if tensor is None:  # not in this module: the load reports the keys that do not fit
                continue
            record = self._record(tensor)
            if record is not None and record[1] != digest:
                self._refuse(pretrained_name)
            if tensor_digest(tensor) == digest:
                state_dict[prefix + name] = tensor.detach()
            else:
                changed[name] = (pretrained_name, digest)
        if changed:
            pretrained = dict(_named_tensors(self._rebuild()))
            for name, (pretrained_name, digest) in changed.items():
                tensor = pretrained.get(pretrained_name)
                if tensor is None or tensor_digest(tensor) != digest:
                    self._refuse(pretrained_name)
                state_dict[prefix + name] = tensor.detach()

    def _refuse(self, name: str) -> None:
        raise UserError(
            f"the saved state was taken with other pretrained weights ({name} differs from this backbone's); "
            f"use the backbone settings the run was started with",
            key=self._key,
        )
