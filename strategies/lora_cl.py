"""Continual learning with one dynamic-rank LoRA update per experience.

Each experience trains a new low-rank update of the frozen backbone's target linears (Hyder et
al., "Incremental Task Learning with Incremental Rank Updates", ECCV 2022,
https://arxiv.org/abs/2207.09074: a new low-rank matrix per task is added to every layer, the
ones of earlier tasks stay fixed), plus a growing linear head. For a target weight ``W`` after
``t`` experiences::

    W_t = W + sum_{k < t} s_k B_k A_k + s_t B_t A_t,     only (A_t, B_t) and the head train

Past updates are frozen (``old_updates: freeze``, kept apart from ``W``) or merged into ``W``
(``old_updates: merge``: inference then costs one matmul per layer, the updates are no longer
separable). The rank of each update is chosen by importance:

* per-layer starting ranks follow PRILoRA's schedule (Benedek & Wolf, "PRILoRA: Pruned and
  Rank-Increasing Low-Rank Adaptation", EACL 2024 Findings, https://arxiv.org/abs/2401.11316):
  ``r_l`` grows linearly with depth from ``rank`` to ``max_rank`` (``rank_schedule: linear``);
* with a ``rank_budget`` ``b`` and ``grow_every`` ``T``, each update starts at those ranks and
  grows during the experience as IncreLoRA does: every ``T`` optimizer steps (after
  ``grow_warmup`` steps), the ``grow_layers`` layers with the highest importance gain
  ``grow_rank`` components each, until ``sum_l r_l = b``
  (:meth:`~clpeft.components.lora.rank_allocation.RankAllocator.allocate`; the new components start
  with ``B = 0`` and zero optimizer state, the existing ones keep theirs);
* with a ``rank_budget`` ``b`` alone, the trained update is cut to ``sum_l r_l = b`` before it is
  retired: IncreLoRA's layer scores (Zhang et al., "IncreLoRA: Incremental Parameter Allocation
  Method for Parameter-Efficient Fine-tuning", 2023, https://arxiv.org/abs/2308.12043; AdaLoRA's
  smoothed sensitivity ``|w dL/dw|``, accumulated at every step) split ``b`` across the layers
  (:meth:`~clpeft.components.lora.rank_allocation.RankAllocator.split`), and each layer keeps its most
  important components by PRILoRA's score, ``|B_i| |A_i * rms(x)|`` with input statistics
  gathered while training (:meth:`~clpeft.components.lora.LoRALinear.prune`).

Not reproduced from IncreLoRA: its SVD form ``P diag(E) Q`` with orthogonality regulariser and
"advance learning" of reserve components; here growth appends plain LoRA components.

``subspace: inflora`` makes the updates interference-free (Liang & Li, "InfLoRA:
Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024,
https://arxiv.org/abs/2404.00228): before each experience every layer's ``A_t`` is designed from
the experience's inputs outside the subspace of earlier experiences' inputs and frozen, so only
``B_t`` trains and old inputs pass the new update unchanged
(:class:`~clpeft.components.lora.input_subspace.InputSubspace`). After each experience the subspace
grows by the official code's rule (``update_DualGPM``: the energy of the *squared* eigenvalues of
the input covariance); ``subspace: gpm`` designs ``A_t`` the same way but grows the subspace by
GPM's definition (the eigenvalues themselves), which keeps far more directions at the same
threshold. ``tests/reference/test_inflora.py`` runs the official ``_train`` beside this strategy.

With ``adapter: adalora`` and a ``target_rank``, each experience's update follows AdaLoRA's
schedule while it trains (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", ICLR 2023, https://arxiv.org/abs/2303.10512; peft's ``AdaLoraModel``): the loss
gains ``orth_reg_weight * R(P, Q)`` (eq. 4-5, peft's mean of the Frobenius norms), and after every
optimizer step the smoothed sensitivity x uncertainty of each triplet ``(P_i, lambda_i, Q_i)``
(eq. 8-12) is updated and, every ``delta_t`` steps, the singular values of the weakest triplets
across all layers are zeroed (eq. 6-7) to a budget that stays at the starting total rank for
``tinit`` steps, falls cubically to ``target_rank`` per layer by step ``total_step - tfinal`` and
keeps that final mask after (Section 3.3). ``total_step`` is each experience's number of optimizer
steps (left out: the steps the engine plans for the experience, ``train.epochs`` x its batches); every experience runs its own schedule on its new update, and the masked triplets are
dropped before it is frozen or merged (:class:`~clpeft.components.lora.adalora_schedule.AdaLoRASchedule`).
Without ``target_rank`` an ``adalora`` update trains at its full rank and the rank options above
(``rank_budget``, ``grow_every``) allocate its ranks, as for the other kinds.

The cross-entropy covers the current experience's classes only (``train_mask``, as in the
prompt-pool methods' official code), so old classes' head rows are not pushed down.

**On a generative LLM** (``backbone.name: generative_lm``, scenario ``instruction_incremental``):
the updates go into the decoder's linears (``targets`` left at the ViT default adapt ``q_proj`` and
``v_proj``, the other generative strategies' choice), there is no head (the vocabulary is the
output, so ``train_mask``/``align``/``drift_compensation`` are refused), and the loss, the greedy
answers scored by each task's metric and the general text's perplexity are
:class:`~clpeft.components.generative.instruction_tuning.AnswerTraining`'s. InfLoRA's and EVA's
input statistics count every real token of the experience's training examples, prompt and
answer (with end-of-sequence) as training feeds them, run one example at a time so that no padding
enters (:meth:`~clpeft.components.generative.instruction_tuning.AnswerTraining.run_alone`); PRILoRA's
input statistics for ``rank_budget``, gathered on the right-padded training batches themselves, skip the
padding by each batch's attention mask
(:meth:`~clpeft.components.generative.instruction_tuning.AnswerTraining.mark_real_tokens`). This
follows the official code, which has no language-model path (github.com/liangyanshuo/InfLoRA at
e08b00e: image models only) and counts every token its ViT is trained on, all patch tokens and
the class token of each training image (``Attention_LoRA.forward`` with ``get_cur_feat``).

InfLoRA's step size on an LLM: the designed ``A`` holds the top principal directions of each layer's
inputs, where an LLM's inputs put most of any text's energy. On SmolLM2-135M the first task's designed
``A`` passes a median 62 times the input energy ``E|A x|^2`` of a peft-initialised ``A`` (same row
norms); Adam's steps in ``B`` do not shrink with it, so each moves the outputs further than a LoRA's
at the same learning rate. One task (``date_format``, 12 steps) raised the perplexity of 32 plot
summaries from 50.3 to 145.3 at lr 0.003 (a LoRA, or ``subspace: none``: 61.9) and to 56.4 at lr
0.001, learning the task as fully: give ``subspace: inflora`` a lower learning rate than a LoRA there
(the official ViT setup: lr 5e-4, scaling 1).

Paper symbols -> parameters: ``r`` -> ``rank`` (``max_rank`` for PRILoRA's deepest layer),
``alpha`` -> ``alpha``, total rank budget ``b`` -> ``rank_budget``, ``beta_1, beta_2`` (AdaLoRA
smoothing) -> ``beta``, IncreLoRA's ``incre_interval``, ``init_warmup``, ``top_h`` and
``incre_rank_num`` -> ``grow_every``, ``grow_warmup``, ``grow_layers``, ``grow_rank``; InfLoRA's
``lamb``, ``lame`` -> ``subspace_threshold: [lamb, lame]``; AdaLoRA's ``b^(T)/n``, ``T``, ``t_i``,
``t_f``, ``Delta T``, ``gamma`` -> ``target_rank``, ``total_step``, ``tinit``, ``tfinal``, ``delta_t``,
``orth_reg_weight`` (peft's ``target_r``, ``total_step``, ``tinit``, ``tfinal``, ``deltaT``, ``orth_reg_weight``).
"""

from collections.abc import Callable
from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.components.generative import GenerativeHooks
from clpeft.components.generative.instruction_tuning import AnswerTraining, GenerativeOptions
from clpeft.components.heads.head_training import HeadOptions, HeadTraining
from clpeft.components.lora import inject_lora, layer_ranks
from clpeft.components.lora.adalora_schedule import AdaLoRAOptions, AdaLoRASchedule, check_schedule
from clpeft.components.lora.eva import eva_init
from clpeft.components.lora.input_subspace import InputSubspace
from clpeft.components.lora.kinds import AdapterKind, check_adapter
from clpeft.components.lora.rank_allocation import RankAllocator
from clpeft.data import Batch
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy

Fraction = Annotated[float, Field(gt=0, le=1)]
VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]
LLM_TARGETS = GenerativeOptions.model_fields["lora_targets"].default  # the attention's query and value
GENERAL_TEXTS = GenerativeOptions.model_fields["general_text_samples"].default


@register_strategy("lora_cl")
class LoRACL(GenerativeHooks, Strategy):
    """One new low-rank update per experience, rank set by importance (Hyder et al. 2022; PRILoRA, Benedek & Wolf 2024; IncreLoRA, Zhang et al. 2023).

    Args:
        backbone: a backbone with ``nn.Linear`` layers (timm ViT, text encoder, MLP), or a
            ``generative_lm`` (see the module docs).
        targets: module-name suffixes of the adapted linears (``qkv``, ``proj``, ``fc1``,
            ``fc2`` for timm ViTs, ``qkv.q``/``qkv.k``/``qkv.v`` with ``backbone.split_qkv``;
            ``query``, ``value`` for BERT-like encoders; ``q_proj``, ``v_proj`` for decoder LLMs,
            where the default stands for these two).
        rank: ``r`` of every update (the shallowest layers' with ``rank_schedule: linear``).
        max_rank: the deepest layers' rank with ``rank_schedule: linear``.
        rank_schedule: ``constant`` or PRILoRA's ``linear`` increase with depth.
        alpha: LoRA ``alpha``; each update's scaling is ``alpha / r_l``.
        rank_budget: total rank ``b`` of each experience's update: grown to with ``grow_every``,
            else pruned to after training (``None``: keep the starting ranks).
        grow_every: grow the most important layers every this many optimizer steps (IncreLoRA);
            needs ``rank_budget``.
        grow_warmup: optimizer steps of each experience before the first growth.
        grow_layers: how many layers grow at a time.
        grow_rank: components each of them gains.
        beta: AdaLoRA's smoothing ``beta_1 = beta_2`` of the layer scores.
        old_updates: ``freeze`` past updates beside the base weight, or ``merge`` them into it.
        dropout: dropout on the LoRA input.
        subspace: ``none``; ``inflora``: each update's ``A`` designed outside earlier
            experiences' input subspace and frozen, the subspace grown by the official
            ``update_DualGPM`` (squared eigenvalues of the input covariance); ``gpm``: the same
            design, the subspace grown by GPM's criterion (its eigenvalues).
        subspace_threshold: ``epsilon`` for ``inflora``/``gpm``: the share of an experience's input
            energy the subspace keeps; or ``[lamb, lame]``, InfLoRA's schedule from ``lamb`` to
            ``lame`` over the stream (``lamb + (lame - lamb) t / T`` after experience ``t``).
        init: how each experience's update starts: ``default`` (the adapter kind's own start) or
            ``eva`` (Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained
            Variance Adaptation", 2024, https://arxiv.org/abs/2410.07170: ``A`` = the top right-singular
            vectors of the layer's inputs over the experience's training data, ranks redistributed by
            explained variance up to ``round(eva_rho * r)`` per layer, ``B = 0``; ``lora`` and ``dora`` updates).
        eva_rho: EVA's ``rho`` (>= 1), how far one layer's rank may grow above ``rank``.
        adapter: the adapter kind of every update: ``lora``, ``dora``, ``pissa``, ``vera``,
            ``lora_xs`` or ``adalora`` (SVD-form updates; the rank options above allocate their
            ranks) (:mod:`clpeft.components.lora.kinds`).
        adalora: flat keys ``target_rank`` (set: AdaLoRA's schedule within each experience, ``adapter:
            adalora`` only), ``total_step``, ``tinit``, ``tfinal``, ``delta_t``, ``orth_reg_weight`` (see the
            module docs): :class:`~clpeft.components.lora.adalora_schedule.AdaLoRAOptions`.
        head_options: flat keys ``train_mask``, ``align`` (with ``subspace: inflora``: InfLoRA + CA,
            the authors' ``cifar100_infloraca.json``) and ``drift_compensation``:
            :class:`~clpeft.components.heads.HeadOptions`; classifier backbones only.
        general_text_samples: on a ``generative_lm``, how many held-out general texts measure the
            perplexity before and after the stream (``perplexity_before/after/ratio``; 0: not measured).
    """

    cache_features = False  # the backbone's output changes with every update

    @flat_options
    def __init__(
        self,
        backbone,
        targets: list[str] = VIT_TARGETS,
        rank: Annotated[int, Field(ge=1)] = 4,
        max_rank: Annotated[int, Field(ge=1)] | None = None,
        rank_schedule: Literal["constant", "linear"] = "constant",
        alpha: Annotated[float, Field(gt=0)] = 8.0,
        rank_budget: Annotated[int, Field(ge=1)] | None = None,
        grow_every: Annotated[int, Field(ge=1)] | None = None,
        grow_warmup: Annotated[int, Field(ge=0)] = 0,
        grow_layers: Annotated[int, Field(ge=1)] = 1,
        grow_rank: Annotated[int, Field(ge=1)] = 1,
        beta: Annotated[float, Field(ge=0, lt=1)] = 0.85,
        old_updates: Literal["freeze", "merge"] = "freeze",
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
        subspace: Literal["none", "inflora", "gpm"] = "none",
        subspace_threshold: Fraction | tuple[Fraction, Fraction] = 0.97,
        init: Literal["default", "eva"] = "default",
        eva_rho: Annotated[float, Field(ge=1)] = 2.0,
        adapter: AdapterKind = "lora",
        adalora: AdaLoRAOptions = AdaLoRAOptions(),
        head_options: HeadOptions = HeadOptions(),
        general_text_samples: Annotated[int, Field(ge=0)] = GENERAL_TEXTS,
    ):
        self.check_config(
            {
                "rank_schedule": rank_schedule,
                "max_rank": max_rank,
                "grow_every": grow_every,
                "rank_budget": rank_budget,
                "subspace": subspace,
                "adapter": adapter,
                "old_updates": old_updates,
                "init": init,
                **adalora.model_dump(),
            }
        )
        generative = isinstance(backbone, GenerativeLM)
        _check_path(generative, head_options, general_text_samples)
        super().__init__(backbone)
        self.generative = AnswerTraining(backbone, general_text_samples) if generative else None  # before the adapters
        self.lora = inject_lora(
            backbone.net if generative else backbone,
            LLM_TARGETS if generative and targets == VIT_TARGETS else targets,
            rank,
            alpha,
            rank_schedule=rank_schedule,
            max_rank=max_rank,
            dropout=dropout,
            kind=adapter,
            key="strategy.targets",
        )
        self.ranks = layer_ranks(list(self.lora), rank, rank_schedule, max_rank)
        self.alpha = alpha
        self.rank_budget = rank_budget
        if grow_every is not None and sum(self.ranks) >= rank_budget:
            raise UserError(
                f"grow_every: the updates start at total rank {sum(self.ranks)} over {len(self.ranks)} layers, "
                f"already at rank_budget {rank_budget}; raise rank_budget or lower rank",
                key="strategy.rank_budget",
            )
        self.growth = dict(every=grow_every, warmup=grow_warmup, layers=grow_layers, rank=grow_rank)
        self.step = 0  # optimizer steps in this experience
        self.growth_rng: torch.Generator | None = None  # draws grown components, seeded per experience
        self.beta = beta
        self.old_updates = old_updates
        self.aligned = HeadTraining(backbone.feature_dim, head_options)
        self.allocator: RankAllocator | None = None
        self.subspace = None if subspace == "none" else InputSubspace(self.lora, subspace_threshold, criterion=subspace)
        self.init, self.eva_rho = init, eva_rho
        self.schedule = None if adalora.target_rank is None else AdaLoRASchedule(adalora, beta)
        for layer in self.lora.values():
            layer.track_importance = rank_budget is not None
        if self.generative is not None and rank_budget is not None:
            self.generative.mark_real_tokens(self.lora)  # PRILoRA's input statistics: the batches' real tokens only

    @classmethod
    def check_config(cls, params: dict) -> None:
        if params.get("rank_schedule") == "linear" and params.get("max_rank") is None:
            raise UserError("rank_schedule 'linear' needs max_rank (the deepest layers' rank)", key="strategy.max_rank")
        if params.get("grow_every") is not None and params.get("rank_budget") is None:
            raise UserError("grow_every needs rank_budget (the total rank the updates grow to)", key="strategy.rank_budget")
        if params.get("grow_every") is not None and params.get("subspace", "none") != "none":
            raise UserError(
                "grow_every cannot grow InfLoRA updates (their A is designed before training); use subspace: none or drop grow_every",
                key="strategy.grow_every",
            )
        if params.get("init", "default") == "eva":
            if params.get("subspace", "none") != "none" or params.get("grow_every") is not None:
                reason = "InfLoRA designs A itself" if params.get("subspace", "none") != "none" else "grow_every grows the ranks EVA sets"
                raise UserError(
                    f"init: eva starts A from the inputs' singular vectors, but {reason}; drop one of them", key="strategy.init"
                )
            if params.get("adapter", "lora") not in ("lora", "dora"):
                raise UserError(f"init: eva starts lora and dora updates, not {params['adapter']}; use adapter: lora", key="strategy.init")
        check_schedule(params)
        check_adapter(
            params.get("adapter", "lora"),
            key="strategy.adapter",
            grow=params.get("grow_every") is not None,
            prune=params.get("rank_budget") is not None,
            design_a=params.get("subspace", "none") != "none",
            freeze=params.get("old_updates", "freeze") == "freeze",
        )

    def _feed(self, exp: Experience) -> Callable[[], None]:
        """A pass of ``exp``'s training inputs through the backbone (each rank its shard; an LLM's one example at a time)."""

        def run() -> None:
            for b in self.batches(exp.train, shard=True):
                if self.generative is not None:
                    self.generative.run_alone(b.x)  # real tokens only
                else:
                    self.embed(b.x)

        return run

    def _input_covariances(self, exp: Experience) -> list[torch.Tensor]:
        """Every adapted layer's mean ``x x^T`` over ``exp``'s training inputs (all ranks)."""
        return self.subspace.covariances(self.lora, self._feed(exp))

    def _head_features(self, batch: Batch) -> torch.Tensor:
        return self.embed(batch.x)

    def before_experience(self, exp: Experience) -> None:
        if self.generative is None:
            self.aligned.start(exp, self.batches, self._head_features)
        super().before_experience(exp)
        if self.subspace is not None:
            self.subspace.design(self.lora, self._input_covariances(exp))
        if self.init == "eva":
            with torch.no_grad():
                eva_init(self.lora, self._feed(exp), rho=self.eva_rho)
        self.step = 0
        if self.growth["every"]:  # drawn from the state the engine set for this experience: the same on every rank
            self.growth_rng = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        if self.rank_budget is not None:
            budget = self.rank_budget if self.growth["every"] else sum(layer.rank for layer in self.lora.values())
            self.allocator = RankAllocator(
                self.lora, budget, top_k=self.growth["layers"], rank_step=self.growth["rank"], beta1=self.beta, beta2=self.beta
            )

    def before_epoch(self, exp: Experience, epoch: int) -> None:
        """Start AdaLoRA's schedule on the experience's new update with its first epoch, when its step count is known."""
        if self.schedule is not None and self.schedule.allocator is None:
            self.schedule.start(self.lora, self.planned_steps)

    def training_step(self, batch: Batch) -> torch.Tensor:
        loss = self._task_loss(batch)
        return loss if self.schedule is None else loss + self.schedule.penalty()  # AdaLoRA's gamma R(P, Q)

    def _task_loss(self, batch: Batch) -> torch.Tensor:
        """The learner's own loss, before AdaLoRA's regulariser."""
        if self.generative is not None:
            return self.generative.loss(batch.x)  # the answer tokens' cross-entropy
        return self.aligned.loss(self.head(self.embed(batch.x)), batch.y)

    def after_training_step(self) -> bool:
        """Fold the step's gradients into the layer scores; mask on AdaLoRA's schedule or grow on IncreLoRA's."""
        if self.schedule is not None:
            self.schedule.after_step()
        if self.allocator is None:
            return False
        self.allocator.update()
        self.step += 1
        every, warmup = self.growth["every"], self.growth["warmup"]
        if every is None or self.step <= warmup or self.step % every:  # IncreLoRA's condition
            return False
        return bool(self.allocator.allocate(self.growth_rng))

    def after_experience(self, exp: Experience) -> None:
        """Cut the update to the budget, freeze or merge it and start the next one; then align."""
        if self.allocator is not None:
            for name, keep in self.allocator.split(self.rank_budget).items():
                self.lora[name].prune(keep)
            self.allocator = None
        if self.subspace is not None:
            progress = exp.index / exp.stream_length if exp.stream_length else 0.0
            self.subspace.extend(self._input_covariances(exp), progress)
        if self.schedule is not None and self.schedule.allocator is not None:
            self.schedule.finish()
        for layer, rank in zip(self.lora.values(), self.ranks, strict=True):
            layer.new_update(rank, self.alpha, old=self.old_updates)
        if self.generative is None:
            self.aligned.finish(self.head, exp, self.batches, self._head_features)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the aligned head copy (with ``align``), else of the trained head."""
        return self.aligned(self.embed(x), self.head)


def _check_path(generative: bool, head_options: HeadOptions, general_text_samples: int) -> None:
    """Refuse the head's keys on a generative LLM (no head there), and the perplexity's on a classifier."""
    if generative:
        changed = head_options.changed()
        if changed:
            raise UserError(
                f"on a generative_lm backbone lora_cl trains no head (the vocabulary is the output); drop {changed[0]}",
                key=f"strategy.{changed[0]}",
            )
    elif general_text_samples != GENERAL_TEXTS:
        raise UserError(
            "applies to a generative_lm backbone only (the perplexity of general text); drop it", key="strategy.general_text_samples"
        )
