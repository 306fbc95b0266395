"""Continual merging: one task vector per experience, merged into the model that is evaluated.

Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
https://arxiv.org/abs/2212.04089) as a continual learner: experience ``t`` fine-tunes the
backbone -- all of it (``mode: full``) or a LoRA update of its target linears (``mode: lora``)
-- from a starting point ``theta_start`` (the pretrained ``theta_0``, or the current merged
model with ``start_from: merged``) and keeps the task vector ``tau_t = theta_t - theta_start``.
After the experience every task vector so far is merged (:func:`clpeft.merging.merge`)::

    theta_merged = theta_0 + M(tau_1, ..., tau_t)

with ``M`` the chosen method: ``task_arithmetic`` (``lambda sum_k tau_k``), ``ties``
(Yadav et al., "TIES-Merging", NeurIPS 2023, https://arxiv.org/abs/2306.01708), ``dare`` (Yu
et al., "Language Models are Super Mario", ICML 2024, https://arxiv.org/abs/2311.03099) or
``mean`` (Wortsman et al., "Model soups", ICML 2022, https://arxiv.org/abs/2203.05482). The
merged model is what the engine evaluates. The head grows; each class's row is trained in its
own experience (``train_mask``: cross-entropy over the experience's classes) and is not merged.

Stored per experience: ``mode: full`` keeps the fine-tuned weights ``theta_0 + tau_t`` of every
backbone parameter (one backbone copy per experience); ``mode: lora`` keeps the update's
factors ``A_t``, ``B_t`` and ``alpha`` only, merged from the factors by the LoRA-aware path of
:mod:`clpeft.merging`. Buffers (e.g. BatchNorm statistics) are not merged.

**On a generative LLM** (``backbone.name: generative_lm``): each task trains a fresh LoRA on the
answer tokens (:class:`~clpeft.components.generative.InstructionTuning`, flat keys ``lora_targets``,
``lora_rank``, ``lora_alpha``, ``lora_dropout``), its factors are the task vector, and the merged
projections answer every task (scored by each task's metric); ``mode: lora`` only, no head.

Paper symbols -> parameters: ``lambda`` -> ``merge_params.scale``; TIES' ``k`` ->
``merge_params.density``; DARE's ``p`` -> ``merge_params.drop_rate``.
"""

import inspect
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.components.generative import GenerativeHooks, GenerativeOptions, InstructionTuning
from clpeft.components.heads.head_training import HeadOptions, HeadTraining
from clpeft.components.lora import inject_lora
from clpeft.components.lora.kinds import AdapterKind, check_adapter
from clpeft.data import Batch
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.merging import LoraAdapter, get_method, merge
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("merge_cl")
class MergeCL(GenerativeHooks, Strategy):
    """Continual merging: fine-tune a task vector per experience, evaluate their merge (Ilharco et al. 2023).

    Args:
        backbone: the model whose weights are fine-tuned and merged.
        mode: fine-tune every backbone parameter (``full``) or a LoRA update (``lora``).
        method: ``task_arithmetic``, ``ties``, ``dare`` or ``mean``.
        merge_params: the method's parameters, e.g. ``{scale: 0.5}`` or ``{density: 0.2}``.
        merge_seed: seed of DARE's drop masks.
        start_from: fine-tune each experience from the pretrained weights (``base``) or from
            the current merged model (``merged``; the task vector is then the increment).
        targets: adapted linears with ``mode: lora`` (module-name suffixes).
        rank: LoRA rank ``r`` with ``mode: lora``.
        alpha: LoRA ``alpha`` with ``mode: lora``.
        adapter: the adapter kind with ``mode: lora``: ``lora``, ``pissa``, ``vera``, ``lora_xs`` or ``adalora``
            (:mod:`clpeft.components.lora.kinds`); each task vector is its update as LoRA factors.
        head_options: flat keys ``train_mask``, ``align`` (re-aligned on the merged model's
            features) and ``drift_compensation``: :class:`~clpeft.components.heads.HeadOptions`.
        generative: flat keys ``lora_*`` of each task's LoRA on a ``generative_lm`` backbone
            (:class:`~clpeft.components.generative.GenerativeOptions`), in place of ``targets``, ``rank`` and ``alpha``.
    """

    cache_features = False  # the backbone is fine-tuned

    @flat_options
    def __init__(
        self,
        backbone,
        mode: Literal["full", "lora"] = "lora",
        method: Literal["task_arithmetic", "ties", "dare", "mean"] = "task_arithmetic",
        merge_params: dict[str, Any] = {},
        merge_seed: Annotated[int, Field(ge=0)] = 0,
        start_from: Literal["base", "merged"] = "base",
        targets: list[str] = ["qkv", "proj", "fc1", "fc2"],
        rank: Annotated[int, Field(ge=1)] = 8,
        alpha: Annotated[float, Field(gt=0)] = 16.0,
        adapter: AdapterKind = "lora",
        head_options: HeadOptions = HeadOptions(),
        generative: GenerativeOptions = GenerativeOptions(),
    ):
        self.check_config({"method": method, "merge_params": merge_params, "mode": mode, "adapter": adapter})
        super().__init__(backbone)
        self.mode = mode
        self.method = method
        self.merge_params = dict(merge_params)
        self.merge_seed = merge_seed
        self.start_from = start_from
        self.rank, self.alpha = rank, alpha
        self.aligned = HeadTraining(backbone.feature_dim, head_options)
        if isinstance(backbone, GenerativeLM):
            _check_generative(mode, adapter, targets, rank, alpha)
        self.generative = InstructionTuning.of(backbone, generative)
        if self.generative is not None:
            self.lora = self.generative.lora
            self.rank, self.alpha = generative.lora_rank, generative.lora_alpha
        elif mode == "lora":
            self.lora = inject_lora(backbone, targets, rank, alpha, kind=adapter, key="strategy.targets")
        else:
            backbone.requires_grad_(True)
        self.base = {name: t.detach().clone() for name, t in self._weights().items()}
        self.finetuned: list[dict[str, torch.Tensor]] = []
        self._start: dict[str, torch.Tensor] = {}

    @classmethod
    def check_config(cls, params: dict) -> None:
        merge_params = params.get("merge_params") or {}
        if "weights" in merge_params:
            raise UserError(
                "per-model weights cannot be given: the number of task vectors grows with every experience",
                key="strategy.merge_params.weights",
            )
        get_method(params.get("method", "task_arithmetic")).validate(merge_params, key="strategy.merge_params")
        check_adapter(params.get("adapter", "lora"), low_rank=params.get("mode", "lora") == "lora", key="strategy.adapter")

    def _weights(self) -> dict[str, torch.Tensor]:
        """The merged tensors, named as in the plain backbone: every parameter, or the adapted weights."""
        if self.mode == "full":
            return dict(self.backbone.named_parameters())
        return {f"{name}.weight": layer.base_layer.weight for name, layer in self.lora.items()}

    @torch.no_grad()
    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, weight in self._weights().items():
            weight.copy_(tensors[name])

    def _head_features(self, batch: Batch) -> torch.Tensor:
        return self.embed(batch.x)

    def before_experience(self, exp: Experience) -> None:
        if self.generative is None:
            self.aligned.start(exp, self.batches, self._head_features)
        super().before_experience(exp)
        if self.start_from == "base":
            self._load(self.base)
        if self.mode == "full":
            self._start = {name: t.detach().clone() for name, t in self._weights().items()}

    def training_step(self, batch: Batch) -> torch.Tensor:
        if self.generative is not None:
            return self.generative.loss(batch.x)
        return self.aligned.loss(self.head(self.embed(batch.x)), batch.y)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        """Store this experience's task vector, load the merge of all of them, then align the head on it."""
        if self.mode == "lora":
            vector = {}
            for name, layer in self.lora.items():
                vector.update({f"{name}.{key}": t.detach().cpu().clone() for key, t in layer.adapter_tensors().items()})
                layer.new_update(self.rank, self.alpha, old="discard")
        elif self.start_from == "base":
            vector = {name: t.detach().cpu().clone() for name, t in self._weights().items()}
        else:
            vector = {name: (self.base[name] + (t.detach() - self._start[name]).cpu()) for name, t in self._weights().items()}
        self.finetuned.append(vector)
        self._start = {}
        self._load(self.merged())
        if self.generative is None:
            self.aligned.finish(self.head, exp, self.batches, self._head_features)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the aligned head copy (with ``align``), else of the trained head."""
        return self.aligned(self.embed(x), self.head)

    def merged(self) -> dict[str, torch.Tensor]:
        """``theta_0 + M(tau_1, ..., tau_t)`` of the stored task vectors (the weights evaluated)."""
        models = [LoraAdapter.from_state_dict(v) for v in self.finetuned] if self.mode == "lora" else self.finetuned
        return merge(self.base, models, self.method, seed=self.merge_seed, **self.merge_params)

    def get_extra_state(self) -> dict:
        return {"base": self.base, "finetuned": self.finetuned}

    def set_extra_state(self, state: dict) -> None:
        self.base = state["base"]
        self.finetuned = state["finetuned"]


def _check_generative(mode: str, adapter: str, targets: list[str], rank: int, alpha: float) -> None:
    """On a generative LLM the task vectors are LoRAs given by the ``lora_*`` keys: refuse the classifier path's own."""
    if mode != "lora" or adapter != "lora":
        key = "strategy.mode" if mode != "lora" else "strategy.adapter"
        raise UserError("on a generative_lm backbone merge_cl merges one plain LoRA per task: use mode: lora, adapter: lora", key=key)
    defaults = inspect.signature(MergeCL.__init__).parameters
    for name, value in {"targets": targets, "rank": rank, "alpha": alpha}.items():
        if value != defaults[name].default:
            raise UserError(f"on a generative_lm backbone the LoRA is set by lora_{name}; drop {name}", key=f"strategy.{name}")
