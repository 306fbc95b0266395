"""A generative run's model for other tools: each task's LoRA as a peft adapter, the final model merged.

Continual instruction tuning (O-LoRA, Wang et al., EMNLP 2023 Findings,
https://arxiv.org/abs/2310.14152) ends each task with a LoRA (Hu et al., ICLR 2022,
https://arxiv.org/abs/2106.09685) that users serve with peft or fold into the weights.
``logging.export`` writes both into the run directory (:class:`RunExports`):

* ``adapters``: after task ``k``, ``adapters/task_<k>/``, a peft adapter directory
  (:func:`~clpeft.components.lora.files.save_peft_adapter`) that
  ``PeftModel.from_pretrained(base_model, directory)`` loads onto the pretrained model with the
  outputs the run's model had after task ``k``. It holds the whole LoRA update at that point: for
  O-LoRA the frozen past tasks' LoRAs and task ``k``'s, one rank ``(k + 1) r`` LoRA
  ``A = [A_0; ...; A_k]``, ``B = [B_0, ..., B_k]`` (eq. 2's sum ``W + sum_i B_i A_i``, what the
  official code saves after each task: its ``lora_A``/``lora_B`` hold the past tasks, concatenated,
  and ``loranew_A``/``loranew_B`` the current one). Task ``k``'s LoRA alone is the last ``r``
  rows of each ``lora_A`` and columns of each ``lora_B`` (rank ``r``, alpha ``alpha / (k + 1)``
  of the file's). One-LoRA strategies (``seq_finetune``, ``replay``, ``ewc``, ``lwf``,
  ``joint``) store their LoRA as trained up to task ``k``.
* ``merged``: when the stream is over, ``merged/``, a transformers directory that
  ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load: the final
  model with every LoRA layer folded into its weight (:func:`merged_state_dict`; the run's model is
  left as it is) and the run's tokenizer. As large as the pretrained model.

``task_lora`` keeps one LoRA per task in multi-adapter layers
(:mod:`~clpeft.components.generative.task_adapters`) and answers each prompt with one of them; its
model is a separate model per task (O-LoRA's "PerTaskFT"), never one model. So it exports per task,
after task ``k`` (its adapter never changes after that; :func:`~clpeft.components.generative.task_adapters.task_lora`):

* ``adapters``: ``adapters/task_<k>/``, task ``k``'s own LoRA (rank ``r``, ``lora_alpha``), the
  run's model routed to task ``k``;
* ``merged``: ``merged/task_<k>/``, the pretrained model with task ``k``'s LoRA folded in, and the
  tokenizer: the model that answers task ``k``'s prompts, as a user who asks for merged weights
  serves it without peft (one pretrained model's size per task). The router is not in it: a
  prompt of unknown task needs the run itself, or the adapters and a router of one's own.

Each directory is written beside its place and renamed into it (:func:`replace_directory`), so an
interrupted run leaves whole directories; written before the experience's checkpoint, so a run
resumed from a checkpoint has the exports up to it and writes the later ones, the same tensors as
an uninterrupted run.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.components.generative.task_adapters import TaskAdapterLinear, task_lora
from clpeft.components.lora.files import save_peft_adapter
from clpeft.components.lora.injection import lora_layers
from clpeft.components.lora.layer import LoRALinear
from clpeft.errors import UserError

__all__ = ["RunExports", "merged_state_dict", "replace_directory", "save_merged_model"]

_KEY = "logging.export"


class RunExports:
    """Writes what ``logging.export`` lists into the run directory (see the module docstring).

    Args:
        kinds: ``adapters`` and/or ``merged`` (none: nothing is written).
        strategy: the run's strategy; its backbone must be a ``generative_lm`` (with LoRA layers, or
            ``task_lora``'s per-task adapters, for ``adapters``).
        directory: the run directory.

    Raises:
        UserError: an export was asked of a run that has no generative LLM, or no LoRA to export.
    """

    def __init__(self, kinds: Sequence[str], strategy, directory: Path):
        self.kinds = frozenset(kinds)
        self.directory = Path(directory)
        self.backbone = strategy.backbone
        self.per_task = False
        if not self.kinds:
            return
        if not isinstance(self.backbone, GenerativeLM):
            raise UserError(f"exports a generative_lm run's model (this backbone is {type(self.backbone).__name__}); drop it", key=_KEY)
        self.per_task = any(isinstance(m, TaskAdapterLinear) for m in self.backbone.net.modules())
        if "adapters" in self.kinds and not (self.per_task or lora_layers(self.backbone.net)):
            raise UserError("adapters: this strategy trains no LoRA layers to export; list merged only", key=_KEY)

    def after_experience(self, index: int) -> None:
        """``adapters/task_<index>/``: the LoRA as it is after experience ``index`` (per-task LoRAs:
        task ``index``'s, and ``merged/task_<index>/`` with it folded in)."""
        if not self.kinds:
            return
        net, tokenizer = self.backbone.net, self.backbone.tokenizer
        layers = task_lora(net, index) if self.per_task else None
        if "adapters" in self.kinds:
            replace_directory(self.directory / "adapters" / f"task_{index}", lambda d: save_peft_adapter(net, d, layers))
        if "merged" in self.kinds and self.per_task:
            replace_directory(self.directory / "merged" / f"task_{index}", lambda d: save_merged_model(net, tokenizer, d, layers))

    def after_stream(self) -> None:
        """``merged/``: the final model with its LoRA folded in, and the tokenizer (per-task LoRAs: written per task already)."""
        if "merged" in self.kinds and not self.per_task:
            replace_directory(self.directory / "merged", lambda d: save_merged_model(self.backbone.net, self.backbone.tokenizer, d))


def replace_directory(directory: Path, write: Callable[[Path], None]) -> None:
    """``write`` a directory at ``.<name>.tmp`` beside ``directory``, then rename it into place.

    A directory already there is renamed away first and removed after; leftovers of an
    interrupted call are removed before writing.
    """
    tmp, old = (directory.with_name(f".{directory.name}.{suffix}") for suffix in ("tmp", "old"))
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def merged_state_dict(net: nn.Module, layers: Mapping[str, LoRALinear] | None = None) -> dict[str, torch.Tensor]:
    """``net``'s state dict under the plain model's names, each LoRA layer's updates folded into its weight.

    A copy of each LoRA layer is merged (:meth:`LoRALinear.merge
    <clpeft.components.lora.LoRALinear.merge>`, every adapter kind's own folding), so ``net`` is
    unchanged; the other tensors are ``net``'s own. ``layers`` (by module path) stand for the
    modules at their paths instead of ``net``'s LoRA layers (e.g. one task's adapter, :func:`task_lora`).
    """
    layers = lora_layers(net) if layers is None else layers
    prefixes = tuple(f"{path}." for path in layers)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(prefixes)}
    for path, layer in layers.items():
        folded = copy.deepcopy(layer)
        folded.merge()
        state.update({f"{path}.{k}": v for k, v in folded.base_layer.state_dict().items()})
    return state


def save_merged_model(net, tokenizer, directory: Path, layers: Mapping[str, LoRALinear] | None = None) -> None:
    """Save ``net`` with its LoRA (or ``layers``) folded in (:func:`merged_state_dict`) and ``tokenizer`` as a transformers directory.

    The weights go into a model of ``net``'s class built without memory (``meta`` device) that
    takes the merged tensors as they are; its generation config is ``net``'s.

    Raises:
        UserError: ``net`` holds adapter modules other than LoRA layers, which have no place in the plain model.
    """
    with torch.device("meta"):
        plain = type(net)(net.config)
    try:
        plain.load_state_dict(merged_state_dict(net, layers), assign=True)
    except RuntimeError as err:
        raise UserError(
            f"merged: the model does not fold into a plain {type(net).__name__} ({str(err).splitlines()[1].strip()})", key=_KEY
        ) from None
    plain.generation_config = copy.deepcopy(net.generation_config)
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
