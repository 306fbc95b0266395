"""LoRA with a rank that can grow and shrink during training.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
https://arxiv.org/abs/2106.09685) adapts a frozen linear layer ``W`` as
``y = W x + s * B A dropout(x)`` with ``A: (r, in)``, ``B: (out, r)`` and ``s = alpha / r``.
:class:`LoRALinear` follows peft's ``tuners.lora.Linear`` (same initialisation, same forward, so
outputs and gradients agree) and adds what dynamic-rank methods need:

* :meth:`LoRALinear.grow` appends components (IncreLoRA, https://arxiv.org/abs/2308.12043);
* :meth:`LoRALinear.prune` keeps the most important ones, scored as in PRILoRA (Benedek & Wolf,
  "PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation", EACL 2024 Findings,
  https://arxiv.org/abs/2401.11316) by weight magnitude times accumulated input statistics;
* :func:`~clpeft.components.lora.injection.inject_lora` takes a per-layer rank schedule, including PRILoRA's ranks that grow
  linearly with depth;
* ``learnable_scale`` multiplies the update by a trained scalar ``lora_scale`` (starting at 1),
  as LAE's LoRA does (Gao et al., ICCV 2023, https://arxiv.org/abs/2303.10070: its ``Scaler``
  with ``scale: null``): ``y = W x + lora_scale * s * B A dropout(x)``.

**Scaling under growth.** ``s`` is fixed when the layer is built (``alpha / rank`` of that moment)
and never changes; growing or pruning changes ``rank`` and with it :attr:`LoRALinear.alpha`
(``= s * rank``). So ``delta_weight() == (alpha / rank) * B A`` always holds, the output is
unchanged when zero-initialised components are added, and the kept components keep their
learning dynamics. Saved adapters store this ``alpha``, so readers that compute ``alpha / r``
(:mod:`clpeft.merging`, peft) recover ``s``.

**Updates per task.** Continual learners that add one low-rank update per task (Hyder et al.,
"Incremental Task Learning with Incremental Rank Updates", ECCV 2022,
https://arxiv.org/abs/2207.09074) call :meth:`LoRALinear.new_update`: the current update is
either *frozen* -- its factors move into the buffers ``frozen_A``, ``frozen_B``,
``frozen_scaling`` that the forward keeps applying and no optimizer sees -- or *merged* into
the base weight, and a fresh update (``B = 0``: the output is unchanged) takes its place::

    y = W x + sum_{k past} s_k B_k A_k x + s B A dropout(x)

**Adapter kinds.** Other adapters of the LoRA family are subclasses that change how the current
update is parametrised and keep everything else (frozen updates, merging, files, importance):
DoRA (:mod:`~clpeft.components.lora.dora`), VeRA (:mod:`~clpeft.components.lora.vera`) and
LoRA-XS (:mod:`~clpeft.components.lora.lora_xs`); :mod:`~clpeft.components.lora.kinds` builds
them by name. ``init="pissa"`` starts an update at the weight's principal components (PiSSA,
:mod:`~clpeft.components.lora.pissa`): the layer keeps the base weight as it is and subtracts
the starting product with *start components*, frozen components that belong to the current
update (they are merged or discarded with it, and become ordinary frozen components when it is
frozen), so ``W + frozen + s B A`` equals peft's residual weight plus ``s B A``.

Adapters alone are saved with :func:`~clpeft.components.lora.files.save_adapters` as safetensors, one ``<module>.lora_A``,
``<module>.lora_B`` and ``<module>.lora_alpha`` per layer: the format
:mod:`clpeft.merging.lora` reads. Frozen updates are folded into those factors
(:meth:`LoRALinear.combined_factors`), so a file always holds a layer's whole update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.lora.pissa import principal_factors
from clpeft.errors import UserError

__all__ = ["LoRAFactors", "LoRALinear", "frozen", "init_lora_a"]

INITS = ("default", "pissa")


def init_lora_a(a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """peft's (and ``nn.Linear``'s) initialisation of ``A``, in place: kaiming-uniform, ``a=sqrt(5)``."""
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)


def frozen(base: nn.Linear) -> nn.Linear:
    """``base`` with its parameters frozen (checked to be an ``nn.Linear``)."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"LoRA wraps nn.Linear layers, got {type(base).__name__}")
    return base.requires_grad_(False)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update whose rank can change.

    ``y = base_layer(x) + scaling * dropout(x) A^T B^T``; ``B`` starts at zero, ``A`` as in peft.

    Importance tracking (PRILoRA): while :attr:`track_importance` is on, every forward in
    training mode adds the input's per-feature mean square to a running mean
    (``input_sq_mean``, over all tokens seen since the last :meth:`reset_importance`);
    evaluation passes never count. Where the inputs are padded token sequences, :attr:`token_mask`
    (set by whoever feeds the batch, e.g.
    :meth:`~clpeft.components.generative.instruction_tuning.AnswerTraining.mark_real_tokens`) names the
    real positions: ``(...)``, the input's shape without its last dimension, nonzero where real;
    only those count. ``None`` (the default, and on image inputs) counts every position.
    :meth:`importance` scores component ``i`` as
    ``||B[:, i]|| * ||A[i, :] * rms(x)||``, the root mean square of the component's contribution
    to the output when input features are uncorrelated. PRILoRA scores single entries of ``A``
    by ``|A_ij|`` times input feature ``j``'s (exponentially averaged) statistic and masks the
    weak ones; here the same weight-times-input score ranks whole components, so pruning lowers
    the rank, and the statistic is a plain running mean (reset it to forget old data).

    Args:
        base: the layer to adapt; frozen in place and kept as ``base_layer``.
        rank: ``r``, the number of components (>= 1).
        alpha: ``alpha``; the scaling ``alpha / r`` is fixed from here on (see the module docs).
        dropout: dropout on the input of the low-rank path (peft's ``lora_dropout``).
        learnable_scale: multiply the current update by a trained scalar ``lora_scale``
            (initially 1); freezing or merging the update folds it into the frozen factors or the
            weight, and the next update starts again at 1.
        init: ``default`` (peft's: kaiming-uniform ``A``, zero ``B``) or ``pissa`` (every
            update starts at the principal components of the layer's current weight, see the
            module docs).

    Past updates (:meth:`new_update` with ``old="freeze"``) live in the buffers ``frozen_A``
    ``(R, in)``, ``frozen_B`` ``(out, R)`` and ``frozen_scaling`` ``(R,)``, one scaling per
    component; they are applied to the input without dropout.

    Changing the rank replaces ``lora_A`` and ``lora_B`` by new parameters: rebuild the
    optimizer afterwards, or carry it over with :func:`~clpeft.resizing.replace_parameters`.
    Loading a state dict resizes them (and the frozen buffers) to the stored sizes.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        learnable_scale: bool = False,
        init: Literal["default", "pissa"] = "default",
    ):
        super().__init__()
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        if init not in INITS:
            raise UserError(f"unknown LoRA init {init!r}; use one of {', '.join(INITS)}")
        self.base_layer = frozen(base)
        weight = base.weight
        self.lora_A = nn.Parameter(init_lora_a(torch.empty(rank, base.in_features, device=weight.device)))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.lora_scale = nn.Parameter(torch.ones((), device=weight.device)) if learnable_scale else None
        self.merged = False
        self.track_importance = False
        self.token_mask: torch.Tensor | None = None  # the real positions of the next inputs (see the class docs)
        self.register_buffer("input_sq_mean", torch.zeros(base.in_features, device=weight.device))
        self.register_buffer("input_count", torch.zeros((), dtype=torch.long, device=weight.device))
        self.register_buffer("frozen_A", torch.zeros(0, base.in_features, device=weight.device))
        self.register_buffer("frozen_B", torch.zeros(base.out_features, 0, device=weight.device))
        self.register_buffer("frozen_scaling", torch.zeros(0, device=weight.device))
        self.init = init
        self.start_rank = 0  # the last frozen components that undo the current update's (PiSSA) start
        if init == "pissa":
            self._start_principal()

    @property
    def kind(self) -> str:
        """The adapter kind's name (:mod:`~clpeft.components.lora.kinds`)."""
        return "pissa" if self.init == "pissa" else "lora"

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def alpha(self) -> float:
        """``alpha`` such that ``alpha / rank`` is the (fixed) scaling."""
        return self.scaling * self.rank

    @property
    def frozen_rank(self) -> int:
        """Number of components of the frozen past updates."""
        return self.frozen_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        if self.track_importance and self.training:
            self._accumulate(x)
        delta = self._current_output(self.lora_dropout(x).to(self.lora_A.dtype))
        if self.frozen_rank:
            delta = delta + self._frozen_output(x)
        return result + delta.to(result.dtype)

    def _current_output(self, lora_x: torch.Tensor) -> torch.Tensor:
        """The current update applied to the (dropped-out) input: ``s B A x``."""
        delta = F.linear(F.linear(lora_x, self.lora_A), self.lora_B) * self.scaling
        return delta if self.lora_scale is None else delta * self.lora_scale

    def _frozen_output(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen updates applied to the input (no dropout): ``sum_k s_k B_k A_k x``."""
        past = F.linear(x.to(self.frozen_A.dtype), self.frozen_A) * self.frozen_scaling
        return F.linear(past, self.frozen_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the current update, ``delta_weight() == scaling * B @ A`` (differentiable).

        For LoRA the factors themselves, ``B`` times a learnable ``lora_scale``; kinds that
        parametrise the update differently return their equivalent low-rank factors.
        """
        return self.lora_A, self._scaled_b()

    def delta_weight(self) -> torch.Tensor:
        """The current update of the base weight, ``(alpha / rank) * B A`` (times a learnable ``lora_scale``),
        shape ``(out, in)``."""
        a, b = self.factors()
        return (b @ a) * self.scaling

    def effective_weight(self) -> torch.Tensor:
        """``W`` plus the frozen updates in float32: the weight the current update starts from."""
        weight = self.base_layer.weight.detach().float()
        return weight + self.frozen_delta_weight().float() if self.frozen_rank else weight

    def _scaled_b(self) -> torch.Tensor:
        """``B``, times ``lora_scale`` where it is learnable."""
        return self.lora_B if self.lora_scale is None else self.lora_B * self.lora_scale

    def frozen_delta_weight(self) -> torch.Tensor:
        """The frozen past updates together, ``sum_k s_k B_k A_k``, shape ``(out, in)``."""
        return (self.frozen_B * self.frozen_scaling) @ self.frozen_A

    def combined_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, alpha)`` of one update equal to the frozen ones plus the current one.

        ``A = [frozen_A; lora_A]``, ``B = [frozen_B * frozen_scaling / s, lora_B]`` (``lora_B``
        times ``lora_scale`` where it is learnable) and ``alpha = s (R + r)``, so
        ``(alpha / rank) B A`` is the layer's whole update. Without frozen components these are
        the current factors themselves.
        """
        a, b = (t.detach() for t in self.factors())
        if not self.frozen_rank:
            return a, b, self.alpha
        b_frozen = self.frozen_B * (self.frozen_scaling / self.scaling)
        a = torch.cat([self.frozen_A, a])
        b = torch.cat([b_frozen, b], dim=1)
        return a, b, self.scaling * a.shape[0]

    # ------------------------------------------------------------------ merging

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update (frozen ones included) into ``base_layer.weight``; forward then costs one ``nn.Linear``.

        A no-op when already merged. Gradients no longer reach ``A`` and ``B`` while merged.
        """
        if not self.merged:
            self._fold_into_base()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (a no-op when not merged)."""
        if self.merged:
            self._unfold_from_base()
            self.merged = False

    def _fold_into_base(self) -> None:
        """What :meth:`merge` does to the base weight: add :meth:`_whole_delta` (kinds that rescale the weight override it)."""
        weight = self.base_layer.weight
        weight += self._whole_delta().to(weight.dtype)

    def _unfold_from_base(self) -> None:
        """What :meth:`unmerge` does to the base weight: subtract :meth:`_whole_delta`."""
        weight = self.base_layer.weight
        weight -= self._whole_delta().to(weight.dtype)

    def _whole_delta(self) -> torch.Tensor:
        delta = self.delta_weight()
        return delta + self.frozen_delta_weight() if self.frozen_rank else delta

    # ------------------------------------------------------------------ dynamic rank

    @torch.no_grad()
    def _accumulate(self, x: torch.Tensor) -> None:
        """Fold the input's per-feature mean square into ``input_sq_mean``, over :attr:`token_mask`'s real positions only."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        mask = self.token_mask
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise RuntimeError(f"token_mask of shape {list(mask.shape)} does not fit inputs of shape {list(x.shape)}")
            flat = flat[mask.reshape(-1).to(flat.device) != 0]
        n = flat.shape[0]
        if not n:
            return
        total = self.input_count + n
        batch_mean = flat.square().mean(0)
        self.input_sq_mean += (batch_mean - self.input_sq_mean) * (n / total)
        self.input_count.copy_(total)

    @torch.no_grad()
    def synchronize(self, world) -> None:
        """Merge the input statistics of every rank's share (count-weighted), as over the whole data."""
        if world.active and self.track_importance:
            count = self.input_count.double()
            total = world.all_reduce_sum(self.input_sq_mean.double() * count)
            count = world.all_reduce_sum(count.reshape(1))
            self.input_sq_mean.copy_(total / count.clamp(min=1))
            self.input_count.copy_(count[0].long())

    def reset_importance(self) -> None:
        """Forget the accumulated input statistics."""
        self.input_sq_mean.zero_()
        self.input_count.zero_()

    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        """PRILoRA importance of each component, shape ``(rank,)`` (see the class docs).

        Without accumulated statistics every input feature counts equally (pure magnitude).
        """
        rms = self.input_sq_mean.sqrt() if self.input_count > 0 else torch.ones_like(self.input_sq_mean)
        return self.lora_B.norm(dim=0) * (self.lora_A * rms).norm(dim=1)

    def _set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self._replace("lora_A", a)
        self._replace("lora_B", b)

    def _replace(self, name: str, value: torch.Tensor) -> None:
        """Set parameter or buffer ``name`` to ``value`` (a new parameter keeps ``requires_grad``)."""
        old = getattr(self, name)
        if isinstance(old, nn.Parameter):
            setattr(self, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
        else:
            setattr(self, name, value.contiguous())

    def _refuse(self, action: str, reason: str) -> None:
        raise UserError(f"{action} is not defined for {self.kind} adapters: {reason}")

    def _check_unmerged(self, action: str) -> None:
        if self.merged:
            raise RuntimeError(f"unmerge() before {action}: the merged base weight holds the current update")

    @torch.no_grad()
    def grow(self, k: int, generator: torch.Generator | None = None) -> None:
        """Add ``k`` components (``A`` rows as at construction, ``B`` columns zero).

        The output is unchanged: the new components contribute ``0`` and the scaling is fixed.
        ``lora_A`` and ``lora_B`` become new, larger parameters; to train on with the same
        optimizer, :func:`~clpeft.resizing.replace_parameters` moves its state over.
        ``generator`` (a CPU one) draws the new rows, e.g. the same on every data-parallel rank.
        """
        self._check_unmerged("grow()")
        a, b = self.lora_A, self.lora_B
        new_a = init_lora_a(torch.empty(k, a.shape[1], dtype=a.dtype), generator).to(a.device)
        self._set_factors(torch.cat([a, new_a]), torch.cat([b, b.new_zeros(b.shape[0], k)], dim=1))

    @torch.no_grad()
    def prune(self, keep: int) -> torch.Tensor:
        """Keep the ``keep`` most important components (:meth:`importance`), in their order.

        Returns:
            The indices of the kept components (ascending).
        """
        self._check_unmerged("prune()")
        if self.start_rank:
            self._refuse("prune()", "a PiSSA update starts at the weight's principal components, not at zero")
        if not 0 <= keep <= self.rank:
            raise UserError(f"prune(keep={keep}) needs 0 <= keep <= rank ({self.rank})")
        kept = self.importance().topk(keep).indices.sort().values
        self._set_factors(self.lora_A[kept], self.lora_B[:, kept])
        return kept

    @torch.no_grad()
    def new_update(self, rank: int, alpha: float, old: Literal["freeze", "merge", "discard"] = "freeze") -> None:
        """Retire the current update and start a fresh one of ``rank`` components, scaling ``alpha / rank``.

        Args:
            rank: rank of the new update (>= 1); ``A`` initialised as in peft, ``B`` zero.
            alpha: its ``alpha``.
            old: ``freeze`` appends the current update to the frozen buffers (the forward
                keeps applying it, no optimizer sees it); ``merge`` adds its delta to the base
                weight; ``discard`` drops it. With ``freeze`` or ``merge`` the output is
                unchanged (up to rounding).

        The input statistics are reset: they describe the data the new update is trained on.
        """
        self._check_unmerged("new_update()")
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        if old not in ("freeze", "merge", "discard"):
            raise UserError(f"unknown old={old!r}; use 'freeze', 'merge' or 'discard'")
        self._retire(old)
        self._start_update(rank, alpha)
        self.reset_importance()

    def _retire(self, old: str) -> None:
        """Freeze, merge or discard the current update (with its start components)."""
        if old == "freeze":
            if self.rank:
                a, b = self.factors()
                self._append_frozen(a, b, self.scaling)
            self.start_rank = 0  # the start components now belong to a frozen update
            return
        if old == "merge":
            weight = self.base_layer.weight
            weight += (self.delta_weight() + self._start_delta()).to(weight.dtype)
        self._drop_start()

    def _start_update(self, rank: int, alpha: float) -> None:
        """A fresh current update of ``rank`` components: ``B = 0`` (or PiSSA's start), scaling ``alpha / rank``."""
        a = self.lora_A
        self._set_factors(
            init_lora_a(torch.empty(rank, a.shape[1], device=a.device, dtype=a.dtype)),
            self.lora_B.new_zeros(self.lora_B.shape[0], rank),
        )
        self.scaling = alpha / rank
        self._reset_scale()
        if self.init == "pissa":
            self._start_principal()

    def _start_principal(self) -> None:
        """PiSSA: the update's factors become the current weight's principal components, which
        start components subtract again (the output is unchanged)."""
        a, b = principal_factors(self.effective_weight(), self.rank, self.scaling)
        like = self.lora_A
        self._set_factors(a.to(like), b.to(like))
        self._append_frozen(a, -b, self.scaling)
        self.start_rank = self.rank

    def _append_frozen(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        like = self.frozen_A
        self.frozen_A = torch.cat([like, a.detach().to(like.dtype)])
        self.frozen_B = torch.cat([self.frozen_B, b.detach().to(like.dtype)], dim=1)
        self.frozen_scaling = torch.cat([self.frozen_scaling, self.frozen_scaling.new_full((a.shape[0],), scaling)])

    def _start_delta(self) -> torch.Tensor:
        """The start components' part of the weight update (zero without a PiSSA start)."""
        k = self.start_rank
        if not k:
            return self.lora_B.new_zeros(())
        return (self.frozen_B[:, -k:] * self.frozen_scaling[-k:]) @ self.frozen_A[-k:]

    def _drop_start(self) -> None:
        keep = self.frozen_rank - self.start_rank
        self.frozen_A = self.frozen_A[:keep]
        self.frozen_B = self.frozen_B[:, :keep]
        self.frozen_scaling = self.frozen_scaling[:keep]
        self.start_rank = 0

    @torch.no_grad()
    def start_from(self, a: torch.Tensor, scaling: float) -> None:
        """Restart the current update at ``A = a`` (any number of rows, also 0), ``B = 0``, scaling ``scaling``.

        A data-driven start such as EVA's (:mod:`~clpeft.components.lora.eva`); the output is
        unchanged and the frozen updates are kept.
        """
        self._check_unmerged("start_from()")
        if self.start_rank or self.kind not in ("lora", "dora"):
            self._refuse("start_from()", "its A is set by the kind or by PiSSA")
        like = self.lora_A
        self._set_factors(a.to(like), self.lora_B.new_zeros(self.lora_B.shape[0], a.shape[0]))
        self.scaling = scaling
        self._reset_scale()

    def _reset_scale(self) -> None:
        """A fresh ``lora_scale`` of 1 (a new parameter, as the factors are) where it is learnable."""
        if self.lora_scale is not None:
            trainable = self.lora_scale.requires_grad
            self.lora_scale = nn.Parameter(torch.ones_like(self.lora_scale), requires_grad=trainable)

    # ------------------------------------------------------------------ state

    def load_factors(self, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
        """Replace the whole update by ``A``, ``B`` (any rank), scaling ``alpha / rank``; no frozen updates remain."""
        self._check_unmerged("load_factors()")
        if a.shape[1:] != self.lora_A.shape[1:] or b.shape != (self.lora_B.shape[0], a.shape[0]):
            raise UserError(
                f"LoRA factors of shapes A {list(a.shape)}, B {list(b.shape)} do not fit a layer "
                f"with in_features={self.lora_A.shape[1]}, out_features={self.lora_B.shape[0]}"
            )
        like = self.lora_A
        self._set_factors(a.to(like.device, like.dtype), b.to(like.device, like.dtype))
        self.scaling = alpha / a.shape[0]
        self._reset_scale()  # the loaded B holds the whole update
        self.frozen_A = self.frozen_A[:0]
        self.frozen_B = self.frozen_B[:, :0]
        self.frozen_scaling = self.frozen_scaling[:0]
        self.start_rank = 0

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What an adapter file stores for this layer, by key suffix: ``lora_A``, ``lora_B`` and
        ``lora_alpha`` of :meth:`combined_factors` (the whole update as one LoRA update)."""
        a, b, alpha = self.combined_factors()
        return {"lora_A": a, "lora_B": b, "lora_alpha": torch.tensor(alpha, dtype=torch.float64)}

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take the update stored by :meth:`adapter_tensors` (any rank)."""
        self.load_factors(tensors["lora_A"], tensors["lora_B"], tensors["lora_alpha"].item())

    def get_extra_state(self) -> dict[str, Any]:
        return {"scaling": self.scaling, "merged": self.merged, "start_rank": self.start_rank}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.scaling = state["scaling"]
        self.merged = state["merged"]
        self.start_rank = state.get("start_rank", 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # resize the factors and frozen buffers (whatever the kind) to the stored sizes
        for name, own in [*self._parameters.items(), *self._buffers.items()]:
            t = state_dict.get(prefix + name)
            if own is not None and t is not None and t.shape != own.shape:
                self._replace(name, torch.empty_like(t, device=own.device, dtype=own.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        frozen = f", frozen_rank={self.frozen_rank}" if self.frozen_rank else ""
        learnable = ", learnable_scale=True" if self.lora_scale is not None else ""
        init = f", init={self.init}" if self.init != "default" else ""
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}{init}{learnable}{frozen}, merged={self.merged}"


class LoRAFactors(nn.Module):
    """The current factors of some LoRA layers as one module, sharing their parameters.

    What an EMA teacher or a second copy of an adapter needs: the factors alone, without the
    base layers. Its parameters are the ``i``-th layer's own parameters under ``<i>.<name>``:
    ``lora_A`` and ``lora_B`` (and ``lora_scale`` where it is learnable) for LoRA, and each
    kind's trained tensors for the others (DoRA's magnitude, VeRA's scaling vectors, LoRA-XS's
    ``R``);
    :meth:`overrides` names them as the adapted model does, for
    ``torch.func.functional_call(model, factors.overrides(), args)``. A deep copy holds copies
    of the factors and keeps the names. Build a new :class:`LoRAFactors` after layers grow or
    prune (their factors change shape or identity).

    Args:
        layers: LoRA layers by module path (what :func:`inject_lora` returns).
    """

    def __init__(self, layers: Mapping[str, LoRALinear]):
        super().__init__()
        self.paths = list(layers)
        for i, layer in enumerate(layers.values()):
            holder = nn.Module()
            for name, param in layer.named_parameters(recurse=False):
                setattr(holder, name, param)
            self.add_module(str(i), holder)

    def overrides(self) -> dict[str, torch.Tensor]:
        """``{"<path>.lora_A": tensor, "<path>.lora_B": tensor, ...}`` for every layer."""
        return {
            f"{path}.{name}": param for i, path in enumerate(self.paths) for name, param in self.get_submodule(str(i)).named_parameters()
        }
